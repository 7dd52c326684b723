"""Pre-training methods: one file per method, listed in the explicit :data:`METHODS` registry.

Adding a method = one file here + one line below + recipes + tests; the engine does not change.
"""

from mimscale.methods.base import Method, MethodOutput
from mimscale.methods.mae import MAE
from mimscale.methods.simmim import SimMIM

METHODS: dict[str, type[Method]] = {
    "mae": MAE,
    "simmim": SimMIM,
}

__all__ = ["METHODS", "Method", "MethodOutput"]
