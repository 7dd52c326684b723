"""MTO: masked token optimization, a plug-in for any method that feeds mask tokens through a
transformer stack (Choi et al.; METHODS.md §5)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MTOConfig:
    """The ``mto:`` recipe section."""

    enabled: bool = False
