"""Build a registered method from its ``recipes/<name>/cpu_tiny.yaml`` (shared by method tests)."""

from __future__ import annotations

from pathlib import Path

from mimscale.config import Recipe
from mimscale.engine.loop import seed_everything
from mimscale.methods import Method, build_method
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def tiny_method(name: str, *overrides: str, batch: int = 4) -> tuple[Recipe, Method]:
    """The recipe (micro = global batch ``batch``) and its method, initialised from seed 0."""
    recipe = load_recipe(
        REPO / "recipes" / name / "cpu_tiny.yaml",
        [f"train.micro_batch={batch}", f"train.global_batch={batch}", *overrides],
    )
    seed_everything(0)
    return recipe, build_method(recipe)
