"""A trained run back as objects: its resolved recipe and its method with the trained weights.

Above :mod:`mimscale.eval.ckpt` (which only reads files): this needs the method registry.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimscale.config import Recipe
from mimscale.eval.ckpt import method_state_dict, resolve_checkpoint
from mimscale.methods import Method, build_method
from mimscale.registry import load_recipe

__all__ = ["load_method", "recipe_of"]


def recipe_of(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The resolved recipe saved with the checkpoint (plus ``key=value`` overrides)."""
    ckpt_dir, tag = resolve_checkpoint(path)
    return load_recipe(ckpt_dir / tag / "recipe.yaml", overrides or [])


def load_method(
    path: str | Path, overrides: list[str] | None = None, device: str | torch.device = "cpu"
) -> tuple[Method, Recipe]:
    """Rebuild the checkpoint's method from its recipe and load the weights (strict).

    Returns:
        ``(method in eval mode on device, recipe)``.
    """
    recipe = recipe_of(path, overrides)
    if hasattr(recipe.method_cfg, "pretrained"):
        recipe.method_cfg.pretrained = ""  # the checkpoint already holds the fine-tuned weights
    method = build_method(recipe)
    method.load_state_dict(method_state_dict(path), strict=True)
    return method.to(device).eval(), recipe
