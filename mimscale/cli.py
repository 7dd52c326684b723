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
from mimscale.engine.rundir import RunDirBusy, disk_full_line
from mimscale.engine.safe_load import UnsafeCheckpointError


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe and its paths (and print the resolved YAML) without starting anything."""
    import yaml

    from mimscale.registry import load_recipe

    r = load_recipe(recipe_path(args.recipe), args.overrides)
    if args.run_dir:  # for scripts (slurm/pretrain.sbatch): where checkpoints will be
        print(Path(r.run.out_dir) / r.run.name)
        return 0
    if args.nodes is not None or args.gpus_per_node is not None:  # a launch shape: check it, describe it
        from mimscale.preflight import check_paths, describe_shape

        nodes, per_node = args.nodes or 1, args.gpus_per_node or 1
        check_paths(r, nodes * per_node, digests=True, nodes=nodes)
        print(describe_shape(r, args.recipe, args.overrides, nodes, per_node))
        return 0
    _preflight(r, digests=True)
    print(yaml.safe_dump(r.to_dict(), sort_keys=False))
    return 0


def _preflight(recipe: Any, world_size: int = 1, digests: bool = False) -> None:
    from mimscale.preflight import check_paths

    check_paths(recipe, world_size, digests)


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
    recipe = load_recipe(path, args.overrides)
    _preflight(recipe, max(1, args.nproc))
    if args.nproc <= 1:
        from mimscale.train import main as train_main

        return train_main([str(path), *args.overrides])
    from mimscale.engine.rundir import claim

    # This command owns the run directory while its ranks run (they die with it): a second
    # start is refused here, before anything is spawned.
    lock = claim(Path(recipe.run.out_dir) / recipe.run.name)
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
    try:
        return launch([*cmd, str(path), *args.overrides])
    finally:
        lock.release()


def launch(cmd: list[str]) -> int:
    """Run a launcher in its own session; SIGTERM or SIGUSR1 here asks every rank to save and stop.

    The request goes through the stop file the ranks watch (``MIMSCALE_STOP_FILE``), not as a
    signal to the launcher: the deepspeed launcher dies of SIGUSR1 and SIGTERMs the ranks itself,
    torchrun forwards only SIGTERM, and either would end before its ranks have saved. The exit
    status is the ranks' own (rank 0 writes it to ``MIMSCALE_STATUS_FILE``: 75 after a graceful
    stop), since torchrun turns every non-zero rank status into 1. SIGINT goes to the whole group.

    The launcher and the ranks die with this process, even by SIGKILL: the kernel kills the
    launcher (``PR_SET_PDEATHSIG``) and each rank watches this pid (``MIMSCALE_RUN_OWNER``)."""
    import signal
    import tempfile

    from mimscale.engine.rundir import OWNER_ENV, STATUS_ENV, kill_with_parent, read_status

    with tempfile.TemporaryDirectory(prefix="mimscale-launch-") as tmp:
        stop = Path(os.environ.get("MIMSCALE_STOP_FILE") or Path(tmp, "stop"))  # an sbatch's own wins
        status = Path(tmp, "status")
        env = {
            **os.environ, OWNER_ENV: str(os.getpid()), "MIMSCALE_STOP_FILE": str(stop),
            STATUS_ENV: str(status),
        }  # fmt: skip
        proc = subprocess.Popen(cmd, start_new_session=True, env=env, preexec_fn=kill_with_parent)

        def ask_stop(signum: int, frame: object) -> None:
            stop.write_text(f"{signal.Signals(signum).name} to mimscale train\n")

        def interrupt(signum: int, frame: object) -> None:
            os.killpg(proc.pid, signum)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, ask_stop)
        signal.signal(signal.SIGINT, interrupt)
        rc = proc.wait()
        return read_status(status, rc)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.seeds and (args.sweep or args.compare):
        print(f"demo: --seeds runs one method once per seed; it does not combine with "
              f"{'--sweep' if args.sweep else '--compare'}")  # fmt: skip
        return 2
    if args.sweep:  # the CPU scaling sweep (mimscale/scaling/demo.py)
        from mimscale.scaling.demo import run_demo_sweep

        return run_demo_sweep(Path(args.out), args.overrides)
    if args.compare:
        from mimscale.demo.compare import run_compare

        return run_compare(args.compare, Path(args.out), args.overrides, args.teacher)
    if args.seeds:
        from mimscale.demo.seeds import parse_seeds, run_seeds

        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as e:
            print(f"demo: {e}")
            return 2
        return run_seeds(seeds, args.method, Path(args.out), args.overrides, args.teacher)
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
    if r.method_cfg.mode == "linprobe" and r.optim.optimizer != "lars":  # say it, never silently
        print(
            f"note: {args.recipe} trains the linear probe with optim.optimizer={r.optim.optimizer}; MAE's "
            "protocol is LARS (recipes/finetune/linprobe_cpu_tiny.yaml, linprobe_mae_vit_b16.yaml)",
            file=sys.stderr,
        )
    code = cmd_train(args)
    if code == 0 and r.method_cfg.mode == "finetune":
        note = short_finetune_note(Path(r.run.out_dir) / r.run.name)
        if note:
            print(note, file=sys.stderr)
    return code


SHORT_FINETUNE = 1000  # optimizer steps: below this a fine-tune's top-1 gets a note beside it


def short_finetune_note(run_dir: Path) -> str | None:
    """The line printed after a short fine-tune's top-1: a few hundred steps of training the whole
    encoder and a new head on augmented images read far below the frozen linear probe on the same
    encoder (the demo's, fitted to convergence on cached features), which a newcomer would take
    for a broken fine-tune. None for a run of :data:`SHORT_FINETUNE` steps or more, or without a
    top-1 in its ``metrics.jsonl``."""
    import json

    step, top1 = 0, None
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        if line.endswith("}"):
            rec = json.loads(line)
            step, top1 = max(step, int(rec.get("step", 0))), rec.get("eval/top1", top1)
    if top1 is None or step >= SHORT_FINETUNE:
        return None
    return (
        f"[mimscale] note: top-1 {top1:.1f}% after {step} optimizer steps of fine-tuning the whole encoder "
        "and a new head; a fine-tune this short reads below a frozen linear probe fitted to convergence "
        "(the demo's table), which is not a like-for-like readout. For that: mimscale linprobe "
        "recipes/finetune/linprobe_cpu_tiny.yaml finetune.pretrained=<the same run>"
    )


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
    "plan": ("mimscale.scaling.plan", "memory per GPU, fit, step time and GPU-hours of each ZeRO setting"),
    "sweep": ("mimscale.scaling.sweep", "a grid of runs (sizes x methods x ...), and `sweep report DIR`"),
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
    s.add_argument("--nodes", type=int, help="check this many nodes and print the job's shape")
    s.add_argument("--gpus-per-node", type=int, help="ranks per node (with --nodes; default 1)")
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
    s.add_argument(
        "--seeds",
        default="",
        metavar="S1,S2,...",
        help="run the demo once per seed (e.g. 0,1,2) and print the spread of its gains over random init",
    )
    s.add_argument(
        "--sweep", action="store_true", help="the CPU scaling sweep (3 sizes x 3 methods), its report"
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
    except RunDirBusy as e:  # another run writes the run directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mimscale recipes | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as e:  # a full disk: the file it could not write, in one line
        line = disk_full_line(e, "the run directory")
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
