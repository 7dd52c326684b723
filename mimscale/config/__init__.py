"""Recipes, at the bottom of the package: the typed schema, the YAML loader, derived values.

Nothing here imports methods, teachers or evaluation code. :mod:`mimscale.registry` binds the
method table and runs the method and plug-in checks; most callers load recipes through it.
"""

from mimscale.config.derived import Derived, derive, save_recipe
from mimscale.config.loader import (
    apply_overrides,
    check_world_size,
    parse_override,
    read_yaml,
    recipe_from_dict,
    validate,
)
from mimscale.config.schema import (
    DataConfig,
    EvalConfig,
    MaskConfig,
    ModelConfig,
    MTOConfig,
    OptimConfig,
    Recipe,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    ViewConfig,
    WandbConfig,
    recipe_keys,
)
from mimscale.config.typed import RecipeError, build_section

__all__ = [
    "DataConfig",
    "Derived",
    "EvalConfig",
    "MTOConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "RunConfig",
    "TeacherConfig",
    "TrainConfig",
    "ViewConfig",
    "WandbConfig",
    "apply_overrides",
    "build_section",
    "check_world_size",
    "derive",
    "parse_override",
    "read_yaml",
    "recipe_from_dict",
    "recipe_keys",
    "save_recipe",
    "validate",
]
