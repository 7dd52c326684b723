"""Recipe-vs-bank checks for ``teacher.source: precomputed`` (run before any process starts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mimscale.config import RecipeError
from mimscale.targets.bank import BankError, bank_identity, read_bank_manifest, same_file

if TYPE_CHECKING:
    from mimscale.config import Recipe

__all__ = ["check_recipe"]


def _differences(bank: dict[str, Any], mine: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, bank value, recipe value)`` for every key that differs (teacher keys flattened)."""
    out = []
    for key, want in mine.items():
        have = bank.get(key)
        if key == "teacher":
            have = have or {}
            out += [(f"teacher.{k}", have.get(k), v) for k, v in want.items() if have.get(k) != v]
        elif key == "data.views" and isinstance(have, list) and len(have) == len(want):
            for i, (h, w) in enumerate(zip(have, want, strict=True)):  # name the field that differs
                out += [(f"{key}[{i}].{k}", h.get(k), v) for k, v in w.items() if h.get(k) != v]
        elif have != want:
            out.append((key, have, want))
    return out


def _check_images(bank: str, train: str) -> None:
    """The bank covers ``data.train``'s shards, computed from the same bytes (when both are known)."""
    from mimscale.data.manifest import resolve_source
    from mimscale.targets.bank import BankReader

    try:
        source = resolve_source(train)
    except (FileNotFoundError, ValueError):
        return  # data.train's own error is reported where the loader is built, naming its key
    try:
        BankReader(bank).check_images(source.urls, source.sha256)
    except BankError as e:
        raise RecipeError(f".teacher.bank: {e} (data.train={train})") from None


def check_recipe(recipe: Recipe, method_cls: type) -> None:
    """A precomputed teacher's bank must exist and match the recipe key by key.

    Raises:
        RecipeError: ``teacher.bank`` unset or unreadable, or a key (teacher identity, grid,
            normalisation, view config, draft) that differs: names the key and both values.
    """
    cfg = recipe.teacher
    if cfg.source != "precomputed" or not getattr(method_cls, "needs_teacher", False):
        return
    if not cfg.bank:
        raise RecipeError(".teacher.bank: teacher.source is precomputed; give the bank's directory")
    try:
        root, manifest = read_bank_manifest(cfg.bank)
    except BankError as e:
        raise RecipeError(f".teacher.bank: {e}") from None
    _check_images(cfg.bank, recipe.data.train)
    for key, have, want in _differences(manifest.get("identity", {}), bank_identity(recipe)):
        raise RecipeError(
            f".{key}: the bank {root} was computed with {key}={have!r}, the recipe has {want!r}; "
            f"recompute the bank or set {key} to the bank's value"
        )
    _check_weights_file(recipe, root, (manifest.get("teacher_built") or {}).get("weights_file"))


def _check_weights_file(recipe: Recipe, root: Any, recorded: dict[str, Any] | None) -> None:
    """The teacher's weights file is still the one the bank was computed from (same name is
    not enough: a file overwritten in place would pair the images with stale targets)."""
    from mimscale.teachers.weights import resolve_weights

    if recorded is None:  # a random teacher, or a bank written before files were recorded
        return
    path, _ = resolve_weights(recipe.teacher)
    if path is not None and not same_file(recorded, path):
        raise RecipeError(
            f".teacher.pretrained: {path} is not the file the bank {root} was computed from "
            f"(sha256 {recorded['sha256'][:12]}..., {recorded['size']} bytes); recompute the bank "
            f"or restore that file"
        )
