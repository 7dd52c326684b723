"""Recipe checks of the data section that need more than the schema (run before any process starts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mimscale.config import RecipeError

if TYPE_CHECKING:
    from mimscale.config import Recipe

__all__ = ["check_recipe"]


def check_recipe(recipe: Recipe, method_cls: type) -> None:
    """A positive ``data.max_pixels``; ``data.decode: gpu`` needs views the device path
    reproduces, and no precomputed teacher.

    Raises:
        RecipeError: naming the view key (``data.views[i].crop`` ...), ``data.decode`` or
            ``data.max_pixels``.
    """
    if recipe.data.max_pixels < 1:
        raise RecipeError(f".data.max_pixels: {recipe.data.max_pixels} must be a positive pixel count")
    if recipe.data.decode != "gpu":
        return
    from mimscale.data.gpu_decode import check_views

    try:
        check_views(recipe.data.views)
    except ValueError as e:
        raise RecipeError(f".{e}") from None
    if recipe.teacher.source == "precomputed":  # the bank's views are replayed with PIL, pixel-exactly
        raise RecipeError(
            ".data.decode: gpu cannot replay a precomputed teacher's views pixel-exactly "
            "(teacher.source=precomputed); use data.decode=cpu"
        )
