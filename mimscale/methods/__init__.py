"""Pre-training methods: one file per method, listed in the explicit :data:`METHODS` registry.

Adding a method = one file here + one line below + recipes + tests; the engine does not change.
"""

from mimscale.methods.base import Method, MethodOutput
from mimscale.methods.cae_v2 import CAEv2
from mimscale.methods.finetune import Finetune
from mimscale.methods.lc_mae import LCMAE
from mimscale.methods.mae import MAE
from mimscale.methods.mr_mae import MRMAE
from mimscale.methods.simmim import SimMIM

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
    "lc_mae": LCMAE,
    "simmim": SimMIM,
    "cae_v2": CAEv2,
    "mr_mae": MRMAE,
    "finetune": Finetune,  # fine-tuning / linear probing on the same engine (mimscale.eval)
}


def build_method(recipe) -> Method:
    """The method of ``recipe`` with its plug-ins attached (what the engine trains).

    Plug-ins: ``mto`` (``recipe.extras["mto"].enabled``) adds the MTO losses in place, keeping
    the method's class and parameter names (:func:`mimscale.methods.mto.attach`).
    """
    method = METHODS[recipe.method](recipe)
    mto_cfg = recipe.extras.get("mto")
    if mto_cfg is not None and mto_cfg.enabled:
        from mimscale.methods.mto import attach

        attach(method, mto_cfg)
    return method


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
