"""Recipe files: YAML with ``_base_`` inheritance, ``a.b=c`` overrides, then typed validation.

The loader knows no method: the table of method sections (``{name: Config dataclass}``) is an
argument, bound by :mod:`mimscale.registry`, which also runs the method and plug-in checks.
Validation happens before any process is spawned: every error is one :class:`RecipeError`
line naming the file and the dotted key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mimscale.config import safe_yaml
from mimscale.config.paths import shipped_recipe
from mimscale.config.schema import Recipe, recipe_keys
from mimscale.config.typed import RecipeError, build, build_section, short, unknown_key

MAX_BASE_DEPTH = 2


def _deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in delta.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_file(path: Path, referrer: Path | None = None) -> dict[str, Any]:
    """One YAML file as a mapping; every failure names the file (and who referred to it).

    The one reader of recipe files: shipped and user recipes, their ``_base_`` files and the
    ``recipe.yaml`` saved in run and checkpoint directories (resume, eval, export) alike.
    """
    if not path.is_file():
        by = f" (the _base_ of {referrer})" if referrer is not None else ""
        raise RecipeError(f"{path}: recipe file not found{by}")
    if path.stat().st_size > safe_yaml.MAX_BYTES:  # before reading it into memory
        raise RecipeError(f"{path}: {path.stat().st_size} bytes; a recipe is at most {safe_yaml.MAX_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    try:
        data = safe_yaml.load(text)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        # PyYAML's message spans lines (problem, context, a quoted excerpt): one line, bounded
        raise RecipeError(f"{path}: invalid YAML: {short(' '.join(str(e).split()))}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe file is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    return data


def read_yaml(path: Path, depth: int = 0, referrer: Path | None = None) -> dict[str, Any]:
    """A recipe file merged over its ``_base_`` chain (at most :data:`MAX_BASE_DEPTH` levels)."""
    data = parse_file(path, referrer)
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    if depth >= MAX_BASE_DEPTH:
        raise RecipeError(f"{path}: _base_ nested deeper than {MAX_BASE_DEPTH} levels")
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: _base_: expected a recipe file or a list of them, got {short(bases)}")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _deep_merge(merged, read_yaml(_base_path(path, b), depth + 1, path))
    return _deep_merge(merged, data)


def _base_path(path: Path, base: str) -> Path:
    """A ``_base_`` entry as the command line reads a recipe: a file relative to the recipe that
    names it, else a shipped recipe's name (``mae/cpu_tiny``, found in a wheel too)."""
    local = (path.parent / base).resolve()
    if local.is_file():
        return local
    return shipped_recipe(base) or local  # neither: the error names the relative path


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in text:
        raise RecipeError(f"override {short(text)}: expected key.sub=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {short(text)}: empty key component")
    if len(parts) > safe_yaml.MAX_DEPTH:  # a key nests like a value does
        raise RecipeError(f"override {short(text)}: key nested deeper than {safe_yaml.MAX_DEPTH} levels")
    try:
        parsed = safe_yaml.load(value) if value.strip() else None
    except RecipeError as e:
        raise RecipeError(f"override {short(text)}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(
            f"override {short(text)}: cannot parse value: {short(' '.join(str(e).split()))}"
        ) from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with every ``a.b=c`` override applied in order."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise RecipeError(f"override {short(text)}: {short(p)} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def blame(message: str, source: str, overrides: Sequence[str] = ()) -> RecipeError:
    """One error line naming where the bad key came from: the override that set it, else the file.

    ``message`` starts with the dotted key (``train.epochz: unknown key ...``); an override of that
    key, of a key below it or of a section above it is the source (the last such, as it won).
    """
    message = message.lstrip(".")
    key = message.partition(":")[0]
    for text in reversed(overrides):
        set_key = text.partition("=")[0].strip()
        if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")) or set_key.startswith(f"{key}."):
            return RecipeError(f"override {short(text)} (on {source}): {message}")
    return RecipeError(f"{source}: {message}")


def recipe_from_dict(
    raw: dict[str, Any],
    method_configs: Mapping[str, type],
    source: str = "<dict>",
    overrides: Sequence[str] = (),
) -> Recipe:
    """Validate a merged raw mapping into a :class:`Recipe` (errors name ``source``).

    Args:
        raw: the merged YAML mapping (after ``_base_`` and overrides).
        method_configs: method name -> the dataclass of its own section.
        source: the file name errors are reported against.
        overrides: the ``a.b=c`` overrides applied to ``raw``: an error about a key one of them set
            names the override instead of the file.

    Returns:
        The recipe with ``method_cfg`` filled; only the schema-level checks have run.
    """
    raw = copy.deepcopy(raw)
    try:
        safe_yaml.check_numbers(raw)  # every number of every section, before any is used
        method = raw.pop("method", "mae")
        if not isinstance(method, str) or method not in method_configs:
            raise RecipeError(f"method: unknown method {short(method)} (known: {', '.join(method_configs)})")
        method_raw = raw.pop(method, None)
        stray = [k for k in raw if k in method_configs]
        if stray:
            raise RecipeError(f"{stray[0]}: section for method {stray[0]!r} but method is {method!r}")
        known = [*recipe_keys(), method]
        for key in raw:
            if key not in known:
                raise unknown_key("", str(key)[:80], known)
        recipe: Recipe = build(Recipe, {"method": method, **raw}, "")
        recipe.method_cfg = build_section(method_configs[method], method_raw, f".{method}")
        recipe.source = source
        recipe.overrides = list(overrides)
        validate(recipe)
    except RecipeError as e:
        raise blame(str(e), source, overrides) from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None, method_configs: Mapping[str, type]) -> Recipe:
    """Load a recipe file with its ``_base_`` chain and dotted overrides, then validate the schema.

    Most callers want :func:`mimscale.registry.load_recipe`, which binds ``method_configs`` and
    runs the method's and the plug-ins' checks.
    """
    path = Path(path)
    raw = read_yaml(path.resolve())
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, method_configs, str(path), overrides or [])


def _check_positive(r: Recipe) -> None:
    """Counts and sizes that must be > 0 (or >= 0), each named by its key."""
    t, o = r.train, r.optim
    for key, value in (
        ("train.global_batch", t.global_batch),
        ("train.micro_batch", t.micro_batch),
        ("train.ckpt_every", t.ckpt_every),
        ("train.log_every", t.log_every),
        ("train.epochs", t.epochs),
        ("model.patch_size", r.model.patch_size),
        ("model.img_size", r.model.img_size),
        ("train.recon_images", t.recon_images),
    ):
        if value <= 0:
            raise RecipeError(f".{key}: must be > 0, got {value}")
    for key, opt in (("optim.lr", o.lr), ("optim.blr", o.blr)):
        if opt is not None and opt <= 0:
            raise RecipeError(f".{key}: must be > 0, got {opt}")
    for key, value in (
        ("optim.weight_decay", o.weight_decay),
        ("optim.warmup_epochs", o.warmup_epochs),
        ("optim.min_lr", o.min_lr),
        ("train.keep_last", t.keep_last),
        ("train.recon_every", t.recon_every),
        ("data.num_workers", r.data.num_workers),
    ):
        if value < 0:
            raise RecipeError(f".{key}: must be >= 0, got {value}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise RecipeError(f".train.max_steps: must be > 0 (or null), got {t.max_steps}")


def validate(r: Recipe) -> None:
    """Cross-field checks that a type alone cannot express (no method knowledge needed)."""
    _check_positive(r)
    o = r.optim
    if (o.lr is None) == (o.blr is None):
        raise RecipeError(".optim.lr: give exactly one of optim.lr (absolute) and optim.blr (base)")
    if r.train.global_batch % r.train.micro_batch:
        raise RecipeError(
            f".train.global_batch: {r.train.global_batch} is not a multiple of "
            f"train.micro_batch={r.train.micro_batch}"
        )
    if r.train.zero_stage not in (0, 1, 2, 3):
        raise RecipeError(f".train.zero_stage: expected 0, 1, 2 or 3, got {r.train.zero_stage}")
    if r.model.img_size % r.model.patch_size:
        raise RecipeError(".model.img_size: not a multiple of model.patch_size")
    if not 0.0 <= r.mask.ratio < 1.0:
        raise RecipeError(f".mask.ratio: expected 0 <= ratio < 1, got {r.mask.ratio}")
    if r.mask.repeats < 1:
        raise RecipeError(".mask.repeats: must be >= 1")
    if not r.data.views:
        raise RecipeError(".data.views: at least one view is required")
    if r.data.views[0].size != r.model.img_size:
        raise RecipeError(
            f".data.views[0].size: {r.data.views[0].size} differs from model.img_size={r.model.img_size}"
        )
    name = r.run.name
    if not name.strip(".") or "/" in name or "\\" in name or ".." in name:
        # run.name is a directory under run.out_dir: a separator or '..' would write elsewhere
        raise RecipeError(f".run.name: {short(name)} must be a plain directory name (no '/', '\\' or '..')")


def check_world_size(r: Recipe, world_size: int) -> None:
    """The global batch must split into micro-batches over ``world_size`` ranks (known before spawn)."""
    per_step = r.train.micro_batch * world_size
    if r.train.global_batch % per_step:
        raise RecipeError(
            f"{r.source}: train.global_batch={r.train.global_batch} is not divisible by "
            f"train.micro_batch={r.train.micro_batch} x world_size={world_size}; change micro_batch"
        )
