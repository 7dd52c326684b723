"""Find recipes by path or by name, in a source checkout and in an installed wheel alike.

The top-level ``recipes/`` folder ships inside the wheel as ``mimscale/recipes`` (see
pyproject.toml), so ``mimscale train mae/vit_b16`` works after a plain ``pip install .``.
"""

from __future__ import annotations

import re
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


def shipped_recipe(name: str) -> Path | None:
    """The shipped recipe called ``name`` (``mae/cpu_tiny``, with or without ``.yaml``), or None."""
    return next((c for c in _candidates(name) if c.is_file()), None)


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
    shipped = shipped_recipe(str(name))
    if shipped is not None:
        return shipped
    raise RecipeError(
        f"{name}: recipe not found (no such file here, and no shipped recipe of that name); "
        f"`mimscale recipes` lists the shipped ones"
    )


# A header's labelled lines (`# Cost: ...`, `# Launch: ...`) end its opening description.
_LABEL = re.compile(r"^(Expected|Paper|Cost|Launch|Protocol|Host|Used by)\b[^:]*:")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`])")


def summary(header: list[str]) -> str:
    """The first whole sentence of a recipe's header comment (which may wrap over lines)."""
    words: list[str] = []
    for line in header:
        text = line.lstrip("#").strip()
        if not text or (words and _LABEL.match(text)):
            break
        words.append(text)
    return _SENTENCE_END.split(" ".join(words), maxsplit=1)[0]


def list_recipes() -> list[tuple[str, str]]:
    """Every shipped recipe (not the ``_base`` defaults) as ``(name, one-sentence summary)``."""
    root = recipes_root()
    out = []
    for p in sorted(root.rglob("*.yaml")):
        rel = p.relative_to(root)
        if rel.parts[0].startswith("_"):
            continue
        lines = p.read_text().splitlines()
        header = lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))]
        out.append((str(rel.with_suffix("")), summary(header)))
    return out
