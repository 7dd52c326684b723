"""The top of the recipe stack: binds the explicit ``METHODS`` table to the recipe loader.

:mod:`mimscale.config` validates a recipe against the typed schema and knows no method; this
module passes it the method sections (each method's ``Config``), then runs the method's own
``check_recipe`` and every plug-in check (teacher, MTO, evaluation). Adding a plug-in section
means its dataclass in :mod:`mimscale.config.schema`, a ``check_recipe(recipe, method_cls)`` in
its own module, and one line in :data:`PLUGIN_CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mimscale import teachers
from mimscale.config import Recipe, RecipeError, loader
from mimscale.data import check as data_check
from mimscale.eval import section as eval_section
from mimscale.methods import METHODS, Method
from mimscale.methods import mto as mto_plugin
from mimscale.targets import check as targets_check


def method_configs() -> dict[str, type]:
    """Method name -> the dataclass of its recipe section, read from ``METHODS`` at call time."""
    return {name: cls.Config for name, cls in METHODS.items()}


# Plug-in sections validate themselves against the whole recipe and the chosen method class.
PLUGIN_CHECKS: tuple[Callable[[Recipe, type[Method]], None], ...] = (
    data_check.check_recipe,  # first: data.decode conflicts need no bank or teacher file
    teachers.check_recipe,
    mto_plugin.check_recipe,
    eval_section.check_recipe,
    targets_check.check_recipe,
)


def check_recipe(recipe: Recipe) -> None:
    """The method's and the plug-ins' checks (raises :class:`RecipeError` naming file and key)."""
    method_cls = METHODS[recipe.method]
    try:
        method_cls.check_recipe(recipe)
        for check in PLUGIN_CHECKS:
            check(recipe, method_cls)
    except RecipeError as e:
        raise loader.blame(str(e), recipe.source, recipe.overrides) from None


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """A validated :class:`Recipe` from a merged raw mapping (tests, tools)."""
    recipe = loader.recipe_from_dict(raw, method_configs(), source)
    check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file with its ``_base_`` chain and ``a.b=c`` overrides, fully validated.

    Args:
        path: the YAML recipe.
        overrides: ``["optim.lr=2e-4", ...]`` applied after the file.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: one line naming the file and the key.
    """
    recipe = loader.load_recipe(path, overrides, method_configs())
    check_recipe(recipe)
    return recipe


def make_recipe(method: str = "mae", **sections: Any) -> Recipe:
    """A recipe in code (tests, benches): ``make_recipe("mae", model={...}, mae={...})``."""
    return recipe_from_dict({"method": method, "optim": {"blr": 1e-4}, **sections}, "<code>")


__all__ = [
    "METHODS",
    "PLUGIN_CHECKS",
    "check_recipe",
    "load_recipe",
    "make_recipe",
    "method_configs",
    "recipe_from_dict",
]
