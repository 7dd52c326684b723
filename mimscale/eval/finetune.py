"""``mimscale finetune RECIPE`` / ``mimscale linprobe RECIPE``: train ``method: finetune`` recipes.

The classifier is an ordinary method (:class:`mimscale.methods.finetune.Finetune`) trained by the
same engine as pre-training; this command only checks that the recipe is a fine-tuning one and
launches it like ``mimscale train`` (``--nproc`` ranks through ``deepspeed`` or ``torchrun``).
The end-of-run top-1 on ``data.val`` is logged by the evaluation hook (``eval.top1``).
"""

from __future__ import annotations

import argparse

__all__ = ["main", "main_linprobe"]


def main(argv: list[str] | None = None, mode: str | None = None) -> int:
    """``mimscale finetune RECIPE [key=value ...] [--nproc N]`` (``linprobe``: mode linprobe)."""
    from mimscale.cli import cmd_train, recipe_path
    from mimscale.config import RecipeError
    from mimscale.registry import load_recipe

    prog = "mimscale linprobe" if mode == "linprobe" else "mimscale finetune"
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    args = p.parse_args(argv)
    if mode is not None:
        args.overrides = [f"finetune.mode={mode}", *args.overrides]
    r = load_recipe(recipe_path(args.recipe), args.overrides)
    if r.method != "finetune":
        raise RecipeError(f"{args.recipe}: method: {prog} needs method 'finetune', got {r.method!r}")
    return cmd_train(args)


def main_linprobe(argv: list[str] | None = None) -> int:
    """``mimscale linprobe RECIPE ...``: :func:`main` with ``finetune.mode=linprobe``."""
    return main(argv, mode="linprobe")
