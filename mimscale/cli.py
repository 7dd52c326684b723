"""The ``mimscale`` command: train, check, demo, bench, and the data tools.

Hyperparameters are never flags: they are ``key.sub=value`` overrides after the recipe.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mimscale.config import RecipeError
from mimscale.config.paths import recipe_path


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe (and print the resolved YAML) without starting anything."""
    import yaml

    from mimscale.registry import load_recipe

    r = load_recipe(recipe_path(args.recipe), args.overrides)
    print(yaml.safe_dump(r.to_dict(), sort_keys=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Validate, then run in this process or spawn ``--nproc`` ranks through a launcher."""
    path = recipe_path(args.recipe)
    from mimscale.registry import load_recipe

    load_recipe(path, args.overrides)  # fail on a typo before any process is spawned
    if args.nproc <= 1:
        from mimscale.train import main as train_main

        return train_main([str(path), *args.overrides])
    if args.launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "mimscale.train",
        ]
    else:
        cmd = [
            shutil.which("deepspeed") or "deepspeed",
            f"--num_gpus={args.nproc}",
            "--module",
            "mimscale.train",
        ]
    return subprocess.call([*cmd, str(path), *args.overrides])


def cmd_demo(args: argparse.Namespace) -> int:
    if args.compare:
        from mimscale.demo.compare import run_compare

        return run_compare(args.compare, Path(args.out), args.overrides, args.teacher)
    from mimscale.demo.run import run_demo

    return run_demo(method=args.method, out=Path(args.out), overrides=args.overrides, teacher=args.teacher)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a ``method: finetune`` recipe as ``train`` does (``linprobe``: ``finetune.mode=linprobe``).

    The classifier is an ordinary method (:class:`mimscale.methods.finetune.Finetune`) trained by the
    same engine as pre-training; this only checks that the recipe is a fine-tuning one first. The
    end-of-run top-1 on ``data.val`` is logged by the evaluation hook (``eval.top1``).
    """
    if args.mode is not None:
        args.overrides = [f"finetune.mode={args.mode}", *args.overrides]
    from mimscale.registry import load_recipe

    r = load_recipe(recipe_path(args.recipe), args.overrides)
    if r.method != "finetune":
        prog = f"mimscale {args.cmd}"
        raise RecipeError(f"{args.recipe}: method: {prog} needs method 'finetune', got {r.method!r}")
    return cmd_train(args)


# `mimscale bench WHAT ...` -> module with main(argv) printing JSON. Explicit, imported lazily.
BENCHES = {
    "engine": "mimscale.bench.engine",  # engine step vs bare step, images/s, MFU (GPU)
    "data": "mimscale.bench.data",  # decode + augment images/s per worker
    "teacher": "mimscale.bench.teacher",  # teacher share, amortised M = 1, 2, 4, offloaded teacher
    "methods": "mimscale.bench.methods",  # LC-MAE vs MAE step, MTO overhead vs its host
}


def cmd_bench(argv: list[str]) -> int:
    """`mimscale bench [WHAT] ...`: WHAT from BENCHES, default the engine bench."""
    if argv and argv[0] in BENCHES:
        return _delegate(BENCHES[argv[0]], argv[1:])
    return _delegate(BENCHES["engine"], argv)


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


# Subcommands that own their whole argument list (their own flags, e.g. `prep-shards --src`):
# name -> (module with main(argv), help). Dispatched before argparse sees the flags.
DELEGATED = {
    "prep-shards": ("mimscale.data.shards", "ImageFolder / folder / list -> WebDataset shards"),
    "demo-data": ("mimscale.demo.data", "write the digits demo shards"),
    "eval": ("mimscale.eval.standalone", "kNN + linear probe (+ diagnostics) of a checkpoint"),
    "export": ("mimscale.eval.export", "checkpoint encoder -> timm-keyed .safetensors"),
    "diagnose": ("mimscale.eval.diagnostics", "attention distance, MTO heterogeneity, SV spectrum, RAUC"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimscale", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("train", help="train a recipe (one process, or --nproc ranks)")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="key.sub=value")
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("check", help="validate a recipe and print it resolved")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("demo", help="the whole path on a CPU in minutes (embedded digits data)")
    s.add_argument("--method", default="mae")
    s.add_argument("--out", default="runs/demo")
    s.add_argument(
        "--compare",
        default="",
        metavar="M1,M2,...",
        help="run these methods like for like (e.g. mae,cae_v2,mr_mae,lc_mae,mae_mto; slower)",
    )
    s.add_argument(
        "--teacher",
        choices=["trained", "random"],
        default="trained",
        help="CAE v2 / MR-MAE: a supervised digits ViT (default) or a random one (control)",
    )
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_demo)

    for name, mode, help_ in (
        ("finetune", None, "fine-tune a pre-trained encoder (method: finetune recipe)"),
        ("linprobe", "linprobe", "linear probe (MAE LARS protocol) of a pre-trained encoder"),
    ):
        s = sub.add_parser(name, help=help_, description=f"{help_}; launched like `train`.")
        s.add_argument("recipe")
        s.add_argument("overrides", nargs="*", help="key.sub=value")
        s.add_argument("--nproc", type=int, default=1)
        s.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
        s.set_defaults(fn=cmd_finetune, mode=mode)

    # `bench` hands its whole argv to the chosen benchmark (dispatched in main()).
    sub.add_parser("bench", help=f"JSON benchmarks: bench [{'|'.join(BENCHES)}] ... (default engine)")

    for name, (_, help_) in DELEGATED.items():  # listed for --help; dispatched in main()
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        if argv and argv[0] in DELEGATED:
            return _delegate(DELEGATED[argv[0]][0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.fn(args) or 0)
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
