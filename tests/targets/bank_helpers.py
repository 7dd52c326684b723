"""Helpers shared by the target-bank tests (imported by name: tests/targets is on sys.path)."""

from __future__ import annotations

from pathlib import Path

from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def tiny_recipe(method: str, train: str, *overrides: str):
    """The method's cpu_tiny recipe on ``train`` (MR-MAE: focused mimicking on, the default)."""
    return load_recipe(REPO / f"recipes/{method}/cpu_tiny.yaml", [f"data.train={train}", *overrides])
