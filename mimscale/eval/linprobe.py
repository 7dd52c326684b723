"""``mimscale linprobe RECIPE``: a ``method: finetune`` recipe run with ``finetune.mode=linprobe``."""

from __future__ import annotations

from mimscale.eval.finetune import main_linprobe as main

__all__ = ["main"]
