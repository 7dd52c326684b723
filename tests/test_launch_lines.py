"""Every launch line in README.md and in every recipe header, parsed by the real launchers'
own argument parsers (deepspeed's, torchrun's, mimscale's), with its recipe and overrides loaded.

`sbatch --test-only` of the same lines runs in tests/slurm (it needs a Slurm controller).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mimscale.config.paths import recipe_path
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("deepspeed", "torchrun", "sbatch", "mimscale")


def _commands(text: str) -> list[str]:
    """Split a shell line into its ``&&`` parts, comments dropped."""
    code = text.split(" #")[0].strip()
    return [c.strip() for c in code.split("&&") if c.strip().split(" ")[0] in LAUNCHERS]


def readme_lines() -> list[tuple[str, str]]:
    """Every launch command in the README's bash blocks (a line ending in ``\\`` continues)."""
    out, in_bash, held, start = [], False, "", 0
    for n, line in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        if not held:
            start = n
        if line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1] + " "
            continue
        out += [(f"README.md:{start}", c) for c in _commands(held + line)]
        held = ""
    return out


# "# Launch: CMD   (note)" or "#     or: CMD   (note)": the command ends where the note begins.
HEADER = re.compile(r"^#\s+(?:Launch|or):\s+(.*?)(?:\s{2,}\(.*)?$")


def header_lines() -> list[tuple[str, str]]:
    out = []
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("#"):
                break  # the header is the leading comment block
            m = HEADER.match(line)
            if m:
                out += [(f"{path.relative_to(REPO)}:{n}", c) for c in _commands(m.group(1))]
    return out


ALL = readme_lines() + header_lines()


def check_recipe(args: list[str]) -> None:
    """The recipe resolves and its overrides are valid keys with valid values."""
    assert args, "no recipe after the module"
    load_recipe(recipe_path(args[0]), [a for a in args[1:] if "=" in a and not a.startswith("-")])


def check_deepspeed(argv: list[str]) -> None:
    from deepspeed.launcher.runner import parse_args

    a = parse_args(argv)
    assert a.module and a.user_script == "mimscale.train", "deepspeed must run --module mimscale.train"
    check_recipe(a.user_args)


def check_torchrun(argv: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    a = get_args_parser().parse_args(argv)
    assert a.module and a.training_script == "mimscale.train", "torchrun must run -m mimscale.train"
    check_recipe(a.training_script_args)


def check_sbatch(argv: list[str]) -> None:
    i = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
    script = REPO / argv[i]
    assert script.is_file(), f"{argv[i]}: no such template"
    if script.name == "pretrain.sbatch":
        check_recipe(argv[i + 1 :])


def check_mimscale(argv: list[str]) -> None:
    from mimscale.cli import DELEGATED, parse_args

    cmd = argv[0]
    if cmd in ("train", "check"):
        a = parse_args(argv)
        check_recipe([a.recipe, *a.overrides])
    elif cmd in ("finetune", "linprobe"):
        rest = [a for a in argv[1:] if not a.startswith("--nproc") and not a.isdigit()]
        check_recipe(rest)
    else:
        assert cmd in DELEGATED or cmd in ("demo", "bench", "recipes"), f"unknown subcommand {cmd}"


CHECKS = {"deepspeed": check_deepspeed, "torchrun": check_torchrun, "sbatch": check_sbatch,
          "mimscale": check_mimscale}  # fmt: skip


def test_there_are_launch_lines_to_check() -> None:
    kinds = {cmd.split()[0] for _, cmd in ALL}
    assert kinds == set(LAUNCHERS), kinds
    assert len(header_lines()) >= 40


@pytest.mark.parametrize(("where", "line"), ALL, ids=[f"{w} {c.split()[0]}" for w, c in ALL])
def test_launch_line_parses(where: str, line: str) -> None:
    argv = shlex.split(line)
    try:
        CHECKS[argv[0]](argv[1:])
    except SystemExit as e:  # argparse's way of rejecting a line
        pytest.fail(f"{where}: `{line}` is rejected by {argv[0]}'s own parser (exit {e.code})")


def test_deepspeed_rejects_dash_m() -> None:
    """What the old launch line did: the check above would have caught it."""
    with pytest.raises(SystemExit):
        check_deepspeed(["--num_gpus", "8", "-m", "mimscale.train", "recipes/mae/vit_b16.yaml"])
