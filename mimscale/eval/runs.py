"""A trained run back as objects: its resolved recipe and its method with the trained weights.

Above :mod:`mimscale.eval.ckpt` (which only reads files): this needs the method registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    state: dict[str, Any] = dict(method_state_dict(path))
    state.update(_extra_states(path, set(method.state_dict()) - set(state)))
    method.load_state_dict(state, strict=True)
    return method.to(device).eval(), recipe


def _extra_states(path: str | Path, missing: set[str]) -> dict[str, object]:
    """Modules' extra state (``*._extra_state``, e.g. LC-MAE's momentum copy) from the checkpoint.

    DeepSpeed's ZeRO consolidation (``zero_to_fp32``) rebuilds parameters and buffers only; the
    extra state is in rank 0's model-states file, which every ZeRO stage writes. Keys that are
    missing for another reason are left missing, so the strict load still names them.
    """
    wanted = {k for k in missing if k.endswith("._extra_state") or k == "_extra_state"}
    if not wanted:
        return {}
    ckpt_dir, tag = resolve_checkpoint(path)
    files = sorted((ckpt_dir / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        return {}
    module = torch.load(files[0], map_location="cpu", weights_only=True).get("module") or {}
    return {k: module[k] for k in wanted if k in module}
