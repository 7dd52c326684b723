"""What the benchmarks share: ``[RECIPE] key.sub=value ... [--steps N] [--out FILE]``, JSON out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["PEAK_BF16", "emit", "mfu", "peak_bf16_flops", "recipe_args", "recipe_file", "sync"]

# Dense bf16 tensor-core peak (FLOP/s, without 2:4 sparsity) by a substring of
# torch.cuda.get_device_name(), from NVIDIA's datasheets; the first match wins, so the PCIe/NVL
# parts (lower clocks and power) come before the SXM name they contain.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),  # SXM: "NVIDIA H200"
    ("A100", 312e12),  # SXM4 and PCIe alike; before "A10", which it contains
    ("L40S", 362e12),
    ("A10", 125e12),
)


def emit(result: dict[str, Any], out: str | None) -> int:
    """Print the benchmark JSON (and write it to ``out``); the exit code of every bench."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


def recipe_file(name: str) -> Path:
    """``name`` as a path, or relative to the shipped recipes: resolved exactly as the CLI does."""
    from mimscale.config.paths import recipe_path

    return recipe_path(name)


def recipe_args(
    prog: str, doc: str | None, default_recipe: str, steps: int, argv: list[str] | None
) -> tuple[Path, list[str], argparse.Namespace]:
    """Parse ``[RECIPE] key.sub=value ... [--steps N] [--out FILE]`` shared by the benches.

    Args:
        prog: program name for ``--help``.
        doc: description for ``--help``.
        default_recipe: the recipe when none is given (relative to the shipped recipes).
        steps: default of ``--steps``.
        argv: the arguments after ``mimscale bench WHAT``.

    Returns:
        (recipe path, overrides, parsed namespace with ``steps``, ``out`` and ``recipe_given``:
        False when ``default_recipe`` was used).
    """
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("args", nargs="*", help="[RECIPE] key.sub=value ...")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    args = list(a.args)
    a.recipe_given = bool(args) and "=" not in args[0]
    path = recipe_file(args.pop(0) if a.recipe_given else default_recipe)
    return path, args, a


def peak_bf16_flops(gpu: str) -> tuple[float | None, str | None]:
    """(dense bf16 peak FLOP/s of ``gpu``, None) or (None, the reason) for a GPU not in the table."""
    for key, peak in PEAK_BF16:
        if key.lower() in gpu.lower():
            return peak, None
    return None, f"no bf16 peak known for {gpu!r} (mimscale.bench.common.PEAK_BF16)"


def mfu(flops_per_s: float, gpu: str) -> dict[str, Any]:
    """``mfu`` (a fraction of the peak, or None), ``peak_flops`` and, when None, ``mfu_unknown``:
    JSON-safe (never NaN), so a GPU outside the table says why instead of printing NaN."""
    peak, reason = peak_bf16_flops(gpu)
    out: dict[str, Any] = {"mfu": flops_per_s / peak if peak else None, "peak_flops": peak}
    if reason:
        out["mfu_unknown"] = reason
    return out


def sync(device: Any) -> None:
    """Wait for the GPU's queued work so a timer measures it (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
