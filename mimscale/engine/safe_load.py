"""Load checkpoint files without running code from them.

A ``.pt`` file is a pickle: unpickled with ``weights_only=False`` it can call any function
(a ``__reduce__`` payload runs on load). Every file mimscale reads from a user (checkpoints to
resume, export, evaluate or fine-tune from) goes through :func:`load_file`, which unpickles
with ``weights_only=True``: tensors, plain Python containers and numbers, and the three small
DeepSpeed types its optimizer files hold (allow-listed by name in :func:`deepspeed_safe_globals`).

DeepSpeed itself loads with ``weights_only=False`` (its engine's ``load_checkpoint``,
``zero_to_fp32``, the universal-checkpoint loader). We keep DeepSpeed's consolidation and
loading logic and replace only its file reads: inside :func:`safe_torch_load` every
``torch.load`` call is routed to :func:`load_file`, whatever ``weights_only`` it asks for.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["UnsafeCheckpointError", "deepspeed_safe_globals", "load_file", "safe_torch_load"]

# torch is imported lazily: the CLI catches UnsafeCheckpointError without importing torch.
_TORCH_LOAD: Any = None  # the real torch.load, kept while safe_torch_load() has replaced it


def _real_load() -> Any:
    global _TORCH_LOAD
    if _TORCH_LOAD is None:
        import torch

        _TORCH_LOAD = torch.load
    return _TORCH_LOAD


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects other than tensors and allow-listed plain state."""


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed (0.19) writes into its checkpoint files.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the files of ZeRO
    stages 0-3, fp32 and bf16: the optimizer files hold a ``LossScaler`` (a few floats), the
    ``ZeroStageEnum`` and ``fragment_address`` (two ints). All three are plain data: unpickling
    them sets attributes and calls no code of the file's choosing.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_globals() -> list[Any]:
    try:
        return deepspeed_safe_globals()
    except ImportError:  # no DeepSpeed installed: its types cannot be in a file we can use anyway
        return []


def load_file(
    path: str | Path, map_location: Any = "cpu", extra_globals: list[Any] | None = None, **kwargs: Any
) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's few types allow-listed.

    Args:
        path: the file (a path; an open file object is accepted as ``torch.load`` does).
        map_location: as ``torch.load``.
        extra_globals: further allow-listed types for this call only.
        **kwargs: passed to ``torch.load`` (``mmap``); ``weights_only`` is ignored: always True.

    Raises:
        UnsafeCheckpointError: the file holds anything else (one line naming the file and the
            first offending global); nothing from the file has been executed.
    """
    import torch

    load = _real_load()
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)  # a custom unpickler would bypass the weights-only one
    with torch.serialization.safe_globals([*_safe_globals(), *(extra_globals or [])]):
        try:
            return load(path, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", path)
            raise UnsafeCheckpointError(f"{name}: refused to load: {_offender(str(e))}") from None


def _offender(message: str) -> str:
    """The line of torch's weights-only error that names what the file wanted to run."""
    for line in message.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line or "GLOBAL" in line:
            text = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return (
                f"it holds more than tensors and plain data ({text}); a pickle like this can run code "
                "when loaded, so mimscale loads checkpoints with weights_only=True only"
            )
    return f"not a weights-only checkpoint ({message.splitlines()[0] if message else 'unpickling failed'})"


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Route every ``torch.load`` inside the block (DeepSpeed's included) through :func:`load_file`.

    DeepSpeed calls ``torch.load(..., weights_only=False)`` through the ``torch`` module, so
    replacing the attribute for the duration of the call is enough; it is restored on exit,
    also when the load fails. Not for use from several threads at once.
    """
    import torch

    _real_load()  # remember the real loader before replacing it
    previous = torch.load

    def forced(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args:  # torch.load's positional pickle_module: refused, as in load_file
            raise TypeError("torch.load with a custom pickle module is not allowed inside safe_torch_load")
        return load_file(f, map_location=map_location, **kwargs)

    torch.load = forced
    try:
        yield
    finally:
        torch.load = previous
