"""``mimscale eval CKPT --data VAL [--train BANK]``: the training-time evaluations on any checkpoint.

kNN (cosine, k = 20, T = 0.07, DINO vote) and the fast linear probe on frozen features, the
method's own top-1 for fine-tuning checkpoints, and optional diagnostics (JSON + PNG). Runs as
one process, or as ``torchrun --nproc_per_node N -m mimscale.eval.standalone CKPT ...`` with
the feature extraction split across ranks. Prints one JSON line (also written to
``--out/eval.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

__all__ = ["main", "run_eval"]


def _init_dist() -> tuple[int, int, torch.device]:
    """Join the launcher's process group when there is one; (rank, world, device)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device is not None:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device is not None else "gloo")
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    return rank, world, device or torch.device("cpu")


def run_eval(
    ckpt: str | Path,
    val: str = "",
    train: str = "",
    out: str | Path | None = None,
    **eval_kwargs,
) -> dict[str, float]:
    """Evaluate a checkpoint as the training hook would.

    Args:
        ckpt: run dir, checkpoints dir or tag dir.
        val: held-out labeled manifest (default: the recipe's ``eval.val`` / ``data.val``).
        train: labeled bank manifest (default: the recipe's ``eval.train`` / ``data.train``).
        out: directory for ``eval.json`` and diagnostics (rank 0).
        **eval_kwargs: :class:`~mimscale.eval.hooks.EvalConfig` fields (k, pool, linear, ...).

    Returns:
        The results (complete on rank 0).
    """
    from mimscale.eval.hooks import EvalConfig, evaluate
    from mimscale.eval.runs import load_method

    rank, world, device = _init_dist()
    method, recipe = load_method(ckpt, device=device)
    base = recipe.eval
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(eval_kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown evaluation setting {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    cfg = dataclasses.replace(base, val=val or base.val, train=train or base.train, **eval_kwargs)
    if cfg.top1 and not hasattr(method, "predict"):
        cfg.top1 = False
    out_dir = Path(out) if out else None
    diag = out_dir / "diagnostics" if out_dir else None
    res = evaluate(method, recipe, cfg, device, rank, world, diag, progress=True)
    if rank == 0 and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps({"ckpt": str(ckpt), **res}, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``mimscale eval``)."""
    p = argparse.ArgumentParser(prog="mimscale eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("ckpt", help="run dir, checkpoints dir or tag dir")
    p.add_argument("--data", default="", help="held-out labeled manifest.json (default: the recipe's)")
    p.add_argument("--train", default="", help="labeled bank manifest.json for kNN / probe")
    p.add_argument("--out", default=None, help="write eval.json (and diagnostics) here")
    p.add_argument("--pool", choices=["cls", "mean"], default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-knn", action="store_true")
    p.add_argument("--no-linear", action="store_true")
    p.add_argument("--top1", action="store_true", help="the checkpoint's own classifier (fine-tuning)")
    p.add_argument("--diagnostics", default="", help="comma list: attention_distance,spectrum,heterogeneity")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args([a for a in (argv or []) if not a.startswith("--local_rank")])
    kw: dict = {k: v for k, v in {"pool": args.pool, "k": args.k, "temperature": args.temperature,
                                  "batch_size": args.batch_size}.items() if v is not None}  # fmt: skip
    kw.update(knn=not args.no_knn, linear=not args.no_linear, top1=args.top1)
    if args.diagnostics:
        kw["diagnostics"] = [d.strip() for d in args.diagnostics.split(",") if d.strip()]
    from mimscale.eval.ckpt import stdout_to_stderr

    with stdout_to_stderr():  # DeepSpeed's consolidation chatter and progress bars: stdout is the JSON
        res = run_eval(args.ckpt, args.data, args.train, args.out, **kw)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(json.dumps({"ckpt": str(args.ckpt), **res}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
