"""Pre-training methods: one file per method, listed in the explicit :data:`METHODS` registry.

Adding a method = one file here + one line below + recipes + tests; the engine does not change.
"""

from mimscale.config import Recipe
from mimscale.methods.base import Method, MethodOutput
from mimscale.methods.cae_v2 import CAEv2
from mimscale.methods.finetune import Finetune
from mimscale.methods.lc_mae import LCMAE
from mimscale.methods.mae import MAE
from mimscale.methods.mr_mae import MRMAE
from mimscale.methods.mto import attach as attach_mto
from mimscale.methods.simmim import SimMIM

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
    "lc_mae": LCMAE,
    "simmim": SimMIM,
    "cae_v2": CAEv2,
    "mr_mae": MRMAE,
    "finetune": Finetune,  # fine-tuning / linear probing on the same engine (mimscale.eval)
}


def build_method(recipe: Recipe) -> Method:
    """The method of ``recipe`` with its plug-ins attached (what the engine trains).

    Plug-ins: ``mto`` (``recipe.mto.enabled``) adds the MTO losses through the method's
    declared ``plugins`` (run by ``Method.finish``), keeping the method's class and parameter
    names (:func:`mimscale.methods.mto.attach`).

    Args:
        recipe: a recipe validated by :func:`mimscale.registry.load_recipe`.

    Returns:
        The method, in training mode, on the CPU.
    """
    method = METHODS[recipe.method](recipe)
    if recipe.mto.enabled:
        attach_mto(method, recipe.mto)
    return method


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
