"""Checks of the ``eval:`` recipe section (run by :mod:`mimscale.registry`).

Kept apart from :mod:`mimscale.eval.hooks`, which runs evaluations and sits above the registry.
"""

from __future__ import annotations

from mimscale.config import Recipe, RecipeError
from mimscale.methods.base import Method


def check_recipe(recipe: Recipe, method_cls: type[Method]) -> None:
    """The ``eval:`` section's checks against the whole recipe and the chosen method."""
    cfg = recipe.eval
    if cfg.every < 0:
        raise RecipeError(f".eval.every: expected >= 0, got {cfg.every}")
    if not cfg.enabled:
        return
    if not (cfg.knn or cfg.linear or cfg.top1 or cfg.diagnostics):
        raise RecipeError(".eval: enabled but knn, linear, top1 and diagnostics are all off")
    if (cfg.knn or cfg.linear) and not (cfg.train or recipe.data.train):
        raise RecipeError(".eval.train: kNN / linear probe need a labeled bank (eval.train or data.train)")
    if not (cfg.val or recipe.data.val):
        raise RecipeError(".eval.val: evaluation needs a labeled split (eval.val or data.val)")
    if cfg.top1 and not method_cls.can_predict:
        raise RecipeError(f".eval.top1: method {recipe.method!r} has no classifier (predict)")
    if cfg.k < 1 or cfg.batch_size < 1:
        raise RecipeError(".eval.k: k and batch_size must be >= 1")
