"""Find recipes by path or by name, in a source checkout and in an installed wheel alike.

The top-level ``recipes/`` folder ships inside the wheel as ``mimscale/recipes`` (see
pyproject.toml), so ``mimscale train mae/vit_b16`` works after a plain ``pip install .``.
"""

from __future__ import annotations

from pathlib import Path

from mimscale.config.typed import RecipeError

_PACKAGE = Path(__file__).resolve().parents[1]  # the mimscale package


def recipes_root() -> Path:
    """The shipped recipes: ``mimscale/recipes`` in a wheel, the repository's ``recipes/`` otherwise."""
    installed = _PACKAGE / "recipes"
    return installed if installed.is_dir() else _PACKAGE.parent / "recipes"


def _candidates(name: str) -> list[Path]:
    """Where a recipe name may live under the shipped root: ``mae/vit_b16``, ``mae/vit_b16.yaml``
    and ``recipes/mae/vit_b16.yaml`` (a repository-relative path typed outside the repository)."""
    rel = name.removeprefix("./").removeprefix("recipes/")
    names = [rel] if rel.endswith((".yaml", ".yml")) else [f"{rel}.yaml", rel]
    return [recipes_root() / n for n in names]


def recipe_path(name: str | Path) -> Path:
    """Resolve a recipe given as a file path or as a shipped recipe's name.

    A path that exists (relative to the current directory) wins; otherwise the name is looked up
    in the shipped recipes.

    Raises:
        RecipeError: neither exists; the message names both places looked at.
    """
    p = Path(name)
    if p.is_file():
        return p
    for c in _candidates(str(name)):
        if c.is_file():
            return c
    raise RecipeError(
        f"{name}: recipe not found (no such file here, and no shipped recipe of that name); "
        f"`mimscale recipes` lists the shipped ones"
    )


def list_recipes() -> list[tuple[str, str]]:
    """Every shipped recipe (not the ``_base`` defaults) as ``(name, one-line summary)``.

    The summary is the first line of the recipe's header comment.
    """
    root = recipes_root()
    out = []
    for p in sorted(root.rglob("*.yaml")):
        rel = p.relative_to(root)
        if rel.parts[0].startswith("_"):
            continue
        first = next((ln for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        out.append((str(rel.with_suffix("")), first.lstrip("# ").strip()))
    return out
