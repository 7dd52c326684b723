"""Where recipe files are: a path as given, or a name inside the shipped ``recipes/`` folder."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def recipe_path(name: str | Path) -> Path:
    """A recipe path as given, or relative to the shipped ``recipes/`` folder."""
    p = Path(name)
    return p if p.exists() else RECIPES_DIR / name
