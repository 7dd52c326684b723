"""The ``mimscale`` command: train, check, demo, bench, and the data tools.

Hyperparameters are never flags: they are ``key.sub=value`` overrides after the recipe.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from mimscale.config import RecipeError
from mimscale.config.paths import list_recipes, recipe_path
from mimscale.demo import DEFAULT_METHOD
from mimscale.engine.safe_load import UnsafeCheckpointError


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe and its paths (and print the resolved YAML) without starting anything."""
    import yaml

    from mimscale.registry import load_recipe

    r = load_recipe(recipe_path(args.recipe), args.overrides)
    if args.run_dir:  # for scripts (slurm/pretrain.sbatch): where checkpoints will be
        print(Path(r.run.out_dir) / r.run.name)
        return 0
    _preflight(r)
    print(yaml.safe_dump(r.to_dict(), sort_keys=False))
    return 0


def _preflight(recipe: Any, world_size: int = 1) -> None:
    from mimscale.preflight import check_paths

    check_paths(recipe, world_size)


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the shipped recipes with their headers' first line."""
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        print(f"{name:<{width}}  {summary}")
    return 0


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it), for a private rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cmd_train(args: argparse.Namespace) -> int:
    """Validate, then run in this process or spawn ``--nproc`` ranks through a launcher."""
    path = recipe_path(args.recipe)
    from mimscale.registry import load_recipe

    # a typo, a missing path or a world the batch / shards cannot split over: before any spawn
    _preflight(load_recipe(path, args.overrides), max(1, args.nproc))
    if args.nproc <= 1:
        from mimscale.train import main as train_main

        return train_main([str(path), *args.overrides])
    # A fixed default port makes two jobs on one node join each other's rendezvous.
    master_port = getattr(args, "master_port", 0)  # callers with their own parser may lack the flag
    if args.launcher == "torchrun":
        rdzv = (  # --standalone: torchrun binds a free port itself
            ["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{master_port}"]
            if master_port
            else ["--standalone"]
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={args.nproc}"]
    else:
        port = master_port or free_port()
        cmd = [shutil.which("deepspeed") or "deepspeed", f"--num_gpus={args.nproc}", f"--master_port={port}"]
    cmd += ["--module", "mimscale.train"]
    return launch([*cmd, str(path), *args.overrides])


def launch(cmd: list[str]) -> int:
    """Run a launcher in its own process group and pass SIGTERM / SIGUSR1 / SIGINT to the whole
    group: every rank then saves and stops (a launcher alone would not forward SIGUSR1)."""
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        os.killpg(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.compare:
        from mimscale.demo.compare import run_compare

        return run_compare(args.compare, Path(args.out), args.overrides, args.teacher)
    from mimscale.demo.run import run_demo

    return run_demo(
        method=args.method,
        out=Path(args.out),
        overrides=args.overrides,
        teacher=args.teacher,
        targets=args.targets,
    )


class _DemoHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown (where there is one); the methods epilog kept one per line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in ("", None, []):
            return action.help or ""
        return super()._get_help_string(action) or ""


class _DemoHelp(argparse.Action):
    """``demo --help`` lists the methods, read from the recipes only when asked (it imports torch)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from mimscale.demo.run import demo_help

        parser.epilog = demo_help()
        parser.print_help()
        parser.exit()


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
    "suite": "mimscale.bench.suite",  # every speed measurement (GPU) in one JSON
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
    "prep-shards": ("mimscale.data.shards_cli", "ImageFolder / folder / list -> WebDataset shards"),
    "demo-data": ("mimscale.demo.data", "write the digits demo shards"),
    "eval": ("mimscale.eval.standalone", "kNN + linear probe (+ diagnostics) of a checkpoint"),
    "export": ("mimscale.eval.export", "checkpoint encoder -> timm-keyed .safetensors"),
    "import-weights": ("mimscale.eval.import_weights", "official MAE/SimMIM/CAE v2/LUT weights -> run"),
    "diagnose": ("mimscale.eval.diagnostics", "attention distance, MTO heterogeneity, SV spectrum, RAUC"),
    "precompute-targets": (
        "mimscale.targets.precompute",
        "teacher targets of K views per image -> a bank",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimscale", description=__doc__)
    p.add_argument("--version", action="version", version=f"mimscale {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("train", help="train a recipe (one process, or --nproc ranks)")
    s.add_argument("recipe", help="a recipe file, or a shipped recipe's name (mae/vit_b16)")
    s.add_argument("overrides", nargs="*", help="key.sub=value")
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    s.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("check", help="validate a recipe and its data paths; print it resolved")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--run-dir", action="store_true", help="print only the run directory")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("recipes", help="list the shipped recipes")
    s.set_defaults(fn=cmd_recipes)

    s = sub.add_parser(
        "demo",
        help="the whole path on a CPU in minutes (embedded digits data)",
        add_help=False,
        formatter_class=_DemoHelpFormatter,
    )
    s.add_argument("-h", "--help", action=_DemoHelp, help="show this help (and the methods) and exit")
    s.add_argument("--method", default=DEFAULT_METHOD, help="the method to pre-train (listed below)")
    s.add_argument(
        "--out", default="runs/demo", help="the demo directory (data, teacher, one run per method)"
    )
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
        help="CAE v2 / MR-MAE: a supervised digits ViT, or a random one (control)",
    )
    s.add_argument(
        "--targets",
        choices=["online", "precomputed"],
        default="online",
        help="CAE v2 / MR-MAE: run the teacher every step, or precompute a bank of its targets first",
    )
    s.add_argument("overrides", nargs="*", help="key.sub=value, applied last (e.g. train.epochs=20)")
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line of the argparse-routed subcommands (train, check, demo, recipes)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides after a flag (`train R --nproc 8 a.b=c`): argparse leaves them over.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mimscale")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, never installed
        from mimscale import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        if argv and argv[0] in DELEGATED:
            return _delegate(DELEGATED[argv[0]][0], argv[1:])
        args = parse_args(argv)
        return int(args.fn(args) or 0)
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2
    except UnsafeCheckpointError as e:  # a checkpoint that would run code on load: one line, no trace
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mimscale recipes | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
