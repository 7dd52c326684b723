"""Checkpoints through DeepSpeed's own save/load, with an atomic ``latest`` pointer.

DeepSpeed writes its ``latest`` file from rank 0 before the final barrier and not atomically,
so a kill during a save can leave ``latest`` naming a half-written tag. We save with
``save_latest=False`` and, after every rank has finished, rank 0 writes our own pointer
(``LATEST``, via a temp file and ``os.replace``). A tag without the pointer is never loaded,
so a kill at any point leaves the previous checkpoint as the resume point.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.config import Recipe, save_recipe
from mimscale.engine.distributed import all_true, barrier
from mimscale.engine.safe_load import load_file, safe_torch_load

POINTER = "LATEST"


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # the MT19937 tuple
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),  # (version, tuple of ints, float or None)
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load_rng(path: Path) -> dict[str, Any]:
    """This rank's RNG file, weights-only. Files written before the tensor format hold the numpy
    state as an ``ndarray`` pickle: numpy's array reconstruction (data only) is allow-listed."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy >= 2 moved it to _core
    legacy = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray.multiarray._reconstruct]
    return load_file(path, extra_globals=legacy)


def read_pointer(ckpt_dir: str | Path) -> str | None:
    """The tag of the latest complete checkpoint, or None."""
    p = Path(ckpt_dir) / POINTER
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _write_pointer(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{POINTER}.tmp"
    tmp.write_text(tag + "\n")
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / POINTER)


def _prune(ckpt_dir: Path, keep_last: int, current: str, keep_steps: frozenset[int] = frozenset()) -> None:
    tags = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
        key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1,
    )
    for p in tags[: max(0, len(tags) - keep_last)]:
        if p.name != current and int(p.name[4:]) not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


class CheckpointSpaceError(OSError):
    """The device ran out of space while a checkpoint was written; the pointer did not move."""


def _is_out_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    # torch's zip writer drops the errno: a short write surfaces as "unexpected pos N vs M"
    # (measured on a full tmpfs) or "file write failed".
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


def _write_tag(engine, ckpt_dir: Path, tag: str, client_state: dict[str, Any], recipe: Recipe, rank: int):
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        save_recipe(recipe, ckpt_dir / tag / "recipe.yaml")


def save(
    engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], recipe: Recipe, rank: int
) -> str:
    """Save a checkpoint on all ranks; return its tag. Collective: call on every rank.

    Per-rank RNG states are written beside DeepSpeed's files (DeepSpeed's ``client_state``
    is stored once, by rank 0). Older tags beyond ``train.keep_last`` are pruned, except the
    steps listed in ``train.keep_steps``.

    Raises:
        CheckpointSpaceError: the device filled up on some rank. Every rank raises it; the
            partial tag is removed (it would hold the space the next save needs) and ``LATEST``
            still names the last complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    if read_pointer(ckpt_dir) == tag:  # a resume at its final step: that checkpoint is this state
        return tag
    error: BaseException | None = None
    try:
        _write_tag(engine, ckpt_dir, tag, client_state, recipe, rank)
    except (OSError, RuntimeError) as e:
        if not _is_out_of_space(e):
            raise
        error = e
    # every rank's files are on disk (or some rank failed) before the pointer moves
    if all_true(error is None, engine.device) and rank == 0:
        try:
            _write_pointer(ckpt_dir, tag)
        except OSError as e:
            if not _is_out_of_space(e):
                raise
            error = e
    if not all_true(error is None, engine.device):  # also the barrier after the pointer moved
        raise _space_error(ckpt_dir, tag, rank, error)
    if rank == 0:
        _prune(ckpt_dir, recipe.train.keep_last, tag, frozenset(recipe.train.keep_steps))
    barrier()
    return tag


def _space_error(ckpt_dir: Path, tag: str, rank: int, cause: BaseException | None) -> CheckpointSpaceError:
    """Remove the partial ``tag`` (rank 0) and say what happened, naming the directory."""
    free = shutil.disk_usage(ckpt_dir).free / 2**20 if ckpt_dir.exists() else 0.0
    previous = read_pointer(ckpt_dir)
    if rank == 0 and tag != previous:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    where = f"{POINTER} still names {previous}" if previous else f"there is no {POINTER} checkpoint yet"
    err = CheckpointSpaceError(
        errno.ENOSPC,
        f"no space left on device: checkpoint {tag} could not be written to {ckpt_dir} "
        f"({free:.0f} MiB free); the partial {tag} was removed and {where}",
    )
    err.__cause__ = cause
    return err


def saved_world_size(tag_dir: str | Path) -> int | None:
    """The data-parallel world that wrote a ZeRO checkpoint (one optimizer shard per rank);
    None for ZeRO-0, whose single file fits any world size."""
    return len(list(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def to_universal(ckpt_dir: str | Path, tag: str, rank: int) -> Path:
    """Convert ``tag`` to DeepSpeed's universal checkpoint on rank 0; return the load dir.

    A universal checkpoint stores every parameter and its optimizer state whole
    (``zero/<name>/``), so any number of ranks can take their partitions from it. DeepSpeed's
    converter (``deepspeed.checkpoint.ds_to_universal``) runs in this process with its file reads
    weights-only; the result goes to ``checkpoints/universal/<tag>`` (removed after loading: the
    next checkpoint is written by the new world). Collective: call on every rank.
    """
    from types import SimpleNamespace

    out = Path(ckpt_dir) / "universal"
    if rank == 0:
        from deepspeed.checkpoint.ds_to_universal import main as convert

        shutil.rmtree(out, ignore_errors=True)  # a conversion killed half-way
        out.mkdir()
        args = SimpleNamespace(
            input_folder=str(Path(ckpt_dir) / tag), output_folder=str(out / tag), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True,  # the version marker Megatron adds; our files are plain ZeRO
        )  # fmt: skip
        with safe_torch_load():
            convert(args)
        for f in (Path(ckpt_dir) / tag).glob("rng_rank*.pt"):
            shutil.copy2(f, out / tag / f.name)
    barrier()
    return out


def load(engine, ckpt_dir: str | Path, tag: str, rank: int) -> dict[str, Any]:
    """Load ``tag`` (model, optimizer, scheduler through DeepSpeed) and this rank's RNG state.

    Every file is read with ``weights_only=True`` (:mod:`mimscale.engine.safe_load`). A ZeRO
    checkpoint written by another number of ranks is converted to DeepSpeed's universal format
    (:func:`to_universal`) and loaded from there; per-rank RNG states then come from the old
    rank of the same index where there is one.

    Returns:
        The client state saved with the checkpoint.

    Raises:
        UnsafeCheckpointError: a file holds more than tensors and plain data (nothing ran).
    """
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    saved = saved_world_size(Path(ckpt_dir) / tag)
    universal = saved is not None and saved != world
    load_dir = to_universal(ckpt_dir, tag, rank) if universal else Path(ckpt_dir)
    engine._config.load_universal_checkpoint = universal  # DeepSpeed reads it at load time only
    try:
        with safe_torch_load():  # DeepSpeed reads with weights_only=False; we never do
            path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded by DeepSpeed")
    rng = load_dir / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(_load_rng(rng))
    if universal:
        barrier()  # every rank has read it
        if rank == 0:
            shutil.rmtree(load_dir, ignore_errors=True)
    return client or {}


def data_position(saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The loader position to resume from, re-split when the world size changed.

    Same world size: the position is returned unchanged (and an exact resume follows). A
    position at an epoch boundary loses nothing: the epoch starts on the new layout.

    ``data.epoch_mode: exact``, mid-epoch: the interrupted epoch is *re-split*. What the old
    layout read is a pure function of it (:func:`mimscale.data.reader.unread_positions`), so the
    unread samples, and only they, are read as the epoch's remainder on the new layout (padded to
    equal batches per rank), then the next epoch starts: no sample of the epoch is skipped or
    read twice. The returned state lists the layouts the epoch was read on (``passes``), so
    another change of world size inside the remainder re-splits what is still unread. A shard
    found truncated (``data.on_error: skip``) shortened its reader's stream, so the replay of
    that reader is off by its missing samples: the log line then says the re-split may repeat or
    miss a few. A checkpoint without the replay's keys (written before re-splitting existed) or
    another seed or data set falls back to the skip below. The trainer counts steps, not
    epochs: the remainder and the epochs after it share the run's unchanged step budget, so the
    run stops at the same step; the remainder's padding (at most about one batch per worker) only
    moves where the last epoch is cut.

    ``resampled`` mode draws shards with replacement and has no exact epoch to re-split: the rest
    of the interrupted epoch is skipped (said in the log, with its size; never repeated) and the
    next epoch starts at batch 0 on the new layout.

    Args:
        saved: the loader ``state_dict()`` in the checkpoint.
        now: this run's loader ``state_dict()`` (its layout).

    Returns:
        ``(state for load_state_dict, a line for the log or None)``.
    """
    if saved.get("world_size", now["world_size"]) == now["world_size"]:
        return saved, None
    from mimscale.data.reader import EpochPass, exact_batches, unread_positions

    epoch, done, per_epoch = int(saved["epoch"]), int(saved["batches"]), int(saved["batches_per_epoch"])
    passes = [EpochPass(**p) for p in saved.get("passes", ())]
    line = f"world size {saved['world_size']} -> {now['world_size']}: "
    if done == 0 and not passes:
        return {**now, "epoch": epoch, "batches": 0}, line + f"epoch {epoch} starts on the new layout"
    where = f"epoch {epoch} was {done}/{per_epoch} batches in"
    if passes:
        where = f"epoch {epoch} (re-split {len(passes)}x) was {done} batches into its remainder"
    why = _no_resplit(saved, now)
    if why is not None:
        rest = "the rest of its remainder is"  # its size: the replay this fallback cannot do
        if not passes:
            rest = f"its {max(0, per_epoch - done) * int(saved['batch_size']) * int(saved['world_size'])}"
            rest += " unread samples are"
        line += f"{where}; {why}: {rest} skipped (never repeated), epoch {epoch + 1} starts on the new layout"
        return {**now, "epoch": epoch + 1, "batches": 0}, line
    if done:
        keys = ("world_size", "workers", "batch_size", "shuffle_buffer")
        passes.append(EpochPass(**{k: int(saved[k]) for k in keys}, batches=done))
    left = len(unread_positions(int(now["total"]), int(now["seed"]), epoch, tuple(passes)))
    if left == 0:
        line += f"{where}; only padding was left, epoch {epoch + 1} starts on the new layout"
        return {**now, "epoch": epoch + 1, "batches": 0}, line
    n = exact_batches(left, int(now["world_size"]), int(now["workers"]), int(now["batch_size"]))
    line += (
        f"{where}; its {left} unread samples are re-split over the new layout ({n} batches per rank), "
        f"then epoch {epoch + 1} starts"
    )
    if int(saved.get("shard_errors", 0)):
        line += (
            f"; {saved['shard_errors']} bad shards/samples were counted: a truncated shard shifts what "
            "its reader read, so the re-split may repeat or miss a few samples"
        )
    state = {**now, "epoch": epoch, "batches": 0, "passes": [dataclasses.asdict(p) for p in passes]}
    return state, line


def _no_resplit(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the interrupted epoch cannot be re-split (None: it can)."""
    if saved.get("mode") != "exact" or now["mode"] != "exact":
        return "data.epoch_mode resampled has no exact epoch to re-split"
    if any(k not in saved for k in ("seed", "shuffle_buffer", "total")):
        return "the checkpoint predates epoch re-splitting"
    if saved["seed"] != now["seed"] or saved["total"] != now["total"]:
        return "run.seed or the data set changed"
    return None
