"""Read trained weights back from mimscale checkpoints, whatever the ZeRO stage.

A checkpoint is named by a run directory (``runs/x``), its ``checkpoints/`` directory (the
``LATEST`` pointer is followed) or one tag directory (``runs/x/checkpoints/step00001000``).
Each tag holds the resolved ``recipe.yaml`` it was trained with. ZeRO-1/2/3 partitions are
consolidated with DeepSpeed's own tool (``deepspeed.utils.zero_to_fp32``); a stage-0
checkpoint already holds the whole module. Every file is read with ``weights_only=True``
(:mod:`mimscale.engine.safe_load`): a checkpoint that would run code on load is refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from mimscale.engine.safe_load import load_file, safe_torch_load

__all__ = ["method_state_dict", "resolve_checkpoint"]

POINTER = "LATEST"  # mimscale.engine.checkpoint.POINTER (not imported: that module pulls numpy/engine)


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(checkpoints dir, tag)`` of a run dir, a checkpoints dir or a tag dir.

    Raises:
        FileNotFoundError: nothing that looks like a complete checkpoint is there.
    """
    p = Path(path)
    for ckpt_dir in (p / "checkpoints", p):
        pointer = ckpt_dir / POINTER
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if (ckpt_dir / tag).is_dir():
                return ckpt_dir, tag
    if (p / "recipe.yaml").is_file() and p.parent.is_dir():
        return p.parent, p.name
    raise FileNotFoundError(
        f"{p}: not a mimscale checkpoint (expected a run dir, its checkpoints/ dir with a {POINTER} "
        "pointer, or a tag dir holding recipe.yaml)"
    )


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside to stderr: Python prints, loggers that hold
    ``sys.stdout`` (DeepSpeed's), and C++ writes to file descriptor 1 alike.

    ``mimscale eval`` and ``export`` keep stdout for their JSON result (a script parses it);
    DeepSpeed's ``zero_to_fp32`` prints its progress there.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def method_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The method's full fp32 ``state_dict`` (keys as ``method.state_dict()``) on CPU.

    Raises:
        UnsafeCheckpointError: a file of the checkpoint holds more than tensors and plain data.
    """
    ckpt_dir, tag = resolve_checkpoint(path)
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_torch_load():  # DeepSpeed's consolidation, our weights-only file reads
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        whole = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))  # ZeRO-1/2 (not 3) write these
        if whole:
            # zero_to_fp32 drops frozen parameters at ZeRO-1 (fixed sin-cos pos_embed): they are
            # never updated, so the module copy DeepSpeed saved beside the shards is exact.
            module = load_file(whole[0])["module"]
            sd.update({k: v for k, v in module.items() if k not in sd})
    else:  # ZeRO stage 0: DeepSpeed saved the whole module
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states found")
        sd = load_file(files[0])["module"]
    # non-tensor entries (a module's ``_extra_state``, e.g. LC-MAE's momentum copy) pass through
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}
