"""Recipes: typed defaults in one place, YAML deltas with ``_base_``, ``a.b=c`` overrides.

A recipe file is a small delta over ``recipes/_base/*.yaml``; the defaults of every key live
in the dataclasses below (method-specific keys live in each method's ``Config`` dataclass and
are validated through the explicit ``METHODS`` registry). Validation happens before any
process is spawned: unknown keys, wrong types and missing values raise :class:`RecipeError`
naming the file and the dotted key path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MAX_BASE_DEPTH = 2
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RecipeError(ValueError):
    """A recipe problem, always naming the file and the key path."""


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms; CPU exact-resume tests set it
    resume: Literal["auto", "never"] = "auto"  # auto: continue from out_dir/name/checkpoints/latest


@dataclass
class ViewConfig:
    """One augmented view of a sample (crop params are recorded for exact replay)."""

    size: int = 224
    crop: Literal["rrc", "src", "center", "resize"] = "rrc"  # src = simple resized crop (LC-MAE)
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    hflip: float = 0.5
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; hue = strength / 4
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0


@dataclass
class DataConfig:
    train: str = ""  # manifest.json, or a brace pattern / pipe: url understood by WebDataset
    val: str = ""  # labeled shards for evaluation hooks
    epoch_mode: Literal["resampled", "exact"] = "resampled"
    samples_per_epoch: int | None = None  # default: the manifest's total
    num_workers: int = 4
    shuffle_buffer: int = 1000
    on_error: Literal["skip", "fail"] = "skip"
    draft: bool = True  # PIL JPEG draft mode when the crop is downscaled anyway
    views: list[ViewConfig] = field(default_factory=lambda: [ViewConfig()])


@dataclass
class MaskConfig:
    """Masks are data: generated in collate, ``True = masked``."""

    kind: Literal["random", "block", "simmim", "none"] = "random"
    ratio: float = 0.75
    num_masked: int | None = None  # block: exact masked count (default round(ratio * N))
    min_num_patches: int = 16  # block: minimum block area (BEiT / CAE pre-training args)
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    mask_patch_size: int = 32  # simmim: mask-patch size in pixels
    repeats: int = 1  # amortised teacher: masks per view


@dataclass
class ModelConfig:
    size: Literal["tiny", "small", "base", "large", "huge"] = "base"
    arch: Literal["vit", "beit"] = "vit"  # beit: q/v bias, optional relative position bias
    patch_size: int = 16
    img_size: int = 224
    num_heads: int | None = None  # override (ViT-T with 12 heads as CAE v2)
    embed_dim: int | None = None  # override (tiny CPU models)
    depth: int | None = None  # override (tiny CPU models)
    drop_path: float = 0.0
    layer_scale: float | None = None  # layer-scale init (None = off)
    abs_pos: Literal["sincos", "none"] = "sincos"
    sincos_layout: Literal["mae", "cae"] = "mae"  # channel layout of the fixed table (METHODS.md §1.2)
    rel_pos_bias: Literal["none", "shared"] = "none"  # beit only (SimMIM uses shared)


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute lr; exclusive with blr
    blr: float | None = None  # base lr, scaled by lr_scaling
    lr_scaling: Literal["none", "linear256", "linear512", "sqrt"] = "linear256"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    wd_exclude: Literal["ndim1_bias", "ndim1_bias_tokens"] = "ndim1_bias"  # METHODS.md §6.8
    layer_decay: float | None = None
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)  # multistep: epochs
    gamma: float = 0.1
    clip_grad: float | None = None
    # lars: timm's LARS (MAE linear probe, METHODS.md §1.3), momentum 0.9, trust ratio on the
    # ndim > 1 weights only (MAE util/lars.py); betas / eps are AdamW's.
    optimizer: Literal["adamw", "lars"] = "adamw"


@dataclass
class TrainConfig:
    epochs: float = 1.0
    global_batch: int = 4096
    micro_batch: int = 64  # per rank; accumulation = global / (micro * world)
    zero_stage: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    log_every: int = 20
    ckpt_every: int = 1000  # optimizer steps; a final checkpoint is always written
    keep_last: int = 3
    keep_steps: list[int] = field(default_factory=list)  # never pruned (e.g. MTO's epoch-400 checkpoint)
    nan_patience: int = 5  # consecutive non-finite steps before reloading the last checkpoint
    max_steps: int | None = None  # stop early (tests, benchmarks); the schedule still spans epochs
    log_keys: bool = False  # write every consumed sample key to run_dir/keys_rank{r}.txt (resume audits)


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: Literal["online", "offline", "disabled"] = "online"
    project: str = "mimscale"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    method: str = "mae"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # The selected method's own section (its ``Config`` dataclass), keyed by the method name
    # in YAML, e.g. ``mae: {norm_pix: true}``. Filled by :func:`load_recipe`.
    method_cfg: Any = None
    # Plug-in / auxiliary sections owned by other modules (e.g. ``mto``, ``teacher``).
    extras: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (what is saved beside checkpoints)."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name in ("method", "method_cfg", "extras", "source"):
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        if self.method_cfg is not None:
            out[self.method] = dataclasses.asdict(self.method_cfg)
        for k, v in self.extras.items():
            out[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out


# Sections owned by plug-ins, explicit and imported lazily (no import side effects):
# ``teacher`` (frozen target provider, mimscale/teachers.py), ``mto`` (mimscale/methods/mto.py) and
# ``eval`` (evaluation hooks, mimscale/eval/hooks.py). A section's optional ``check(recipe)`` method
# runs during validation.
def _extra_sections() -> dict[str, type]:
    from mimscale.eval.hooks import EvalConfig
    from mimscale.methods.mto import MTOConfig
    from mimscale.teachers import TeacherConfig

    return {"teacher": TeacherConfig, "mto": MTOConfig, "eval": EvalConfig}


# --------------------------------------------------------------------------- typed parsing


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `2e-4` (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise RecipeError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``; unknown keys are errors naming ``where.key``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise RecipeError(
            f"{where}.{unknown[0]}: unknown key (known keys of {where or 'the recipe'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def build_section(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    """Public helper for plug-ins: validate a raw mapping into dataclass ``cls``."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping ({cls.__name__}), got {raw!r}")
    return _build(cls, raw, where)


# --------------------------------------------------------------------------- YAML loading


def _deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in delta.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    if depth >= MAX_BASE_DEPTH:
        raise RecipeError(f"{path}: _base_ nested deeper than {MAX_BASE_DEPTH} levels")
    merged: dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml((path.parent / b).resolve(), depth + 1))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {text!r}: empty key component")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: cannot parse value: {e}") from e
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise RecipeError(f"override {text!r}: {p} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a merged raw mapping into a :class:`Recipe` (errors name ``source``)."""
    from mimscale.methods import METHODS  # explicit registry; methods import only torch/timm

    raw = copy.deepcopy(raw)
    method = raw.pop("method", "mae")
    if method not in METHODS:
        raise RecipeError(f"{source}: method: unknown method {method!r} (known: {', '.join(METHODS)})")
    method_raw = raw.pop(method, None)
    extras_cls = _extra_sections()
    extras_raw = {k: raw.pop(k) for k in list(raw) if k in extras_cls}
    stray = [k for k in raw if k in METHODS]
    if stray:
        raise RecipeError(f"{source}: {stray[0]}: section for method {stray[0]!r} but method is {method!r}")
    try:
        recipe: Recipe = _build(Recipe, {"method": method, **raw}, "")
        recipe.method_cfg = build_section(METHODS[method].Config, method_raw, f".{method}")
        recipe.extras = {k: build_section(c, extras_raw.get(k), f".{k}") for k, c in extras_cls.items()}
        recipe.source = source
        validate(recipe)
    except RecipeError as e:
        raise RecipeError(f"{source}: {str(e).lstrip('.')}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file with its ``_base_`` chain and dotted overrides, then validate.

    Args:
        path: the YAML recipe.
        overrides: ``["optim.lr=2e-4", ...]`` applied after the file.

    Returns:
        The validated :class:`Recipe`.
    """
    path = Path(path)
    raw = _read_yaml(path.resolve())
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, str(path))


def validate(r: Recipe) -> None:
    """Cross-field checks that a type alone cannot express."""
    name = r.run.name
    if not name.strip(".") or "/" in name or "\\" in name or ".." in name:
        # run.name is a directory under run.out_dir: a separator or '..' would write elsewhere
        raise RecipeError(f".run.name: {name!r} must be a plain directory name (no '/', '\\' or '..')")
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
    from mimscale.methods import METHODS

    METHODS[r.method].check_recipe(r)
    for section in r.extras.values():  # plug-in sections validate themselves against the recipe
        check = getattr(section, "check", None)
        if callable(check):
            check(r)


# --------------------------------------------------------------------------- derived values


@dataclass
class Derived:
    """Every value computed from a recipe and the world size, in one place."""

    world_size: int
    lr: float
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_epoch: int


def derive(r: Recipe, world_size: int, samples_per_epoch: int) -> Derived:
    """Absolute lr, accumulation and step counts for this world size.

    Raises:
        RecipeError: when the global batch cannot be honoured with this world size.
    """
    t, o = r.train, r.optim
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        raise RecipeError(
            f"{r.source}: train.global_batch={t.global_batch} is not divisible by "
            f"train.micro_batch={t.micro_batch} x world_size={world_size}; change micro_batch"
        )
    scale = {
        "none": 1.0,
        "linear256": t.global_batch / 256,
        "linear512": t.global_batch / 512,
        "sqrt": math.sqrt(t.global_batch) / 4,  # LC-MAE / LUT: blr * sqrt(B) / 4
    }[o.lr_scaling]
    lr = o.lr if o.lr is not None else o.blr * scale  # type: ignore[operator]
    steps_per_epoch = max(1, samples_per_epoch // t.global_batch)
    total = max(1, round(t.epochs * steps_per_epoch))
    return Derived(
        world_size=world_size,
        lr=lr,
        grad_accum=t.global_batch // per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(o.warmup_epochs * steps_per_epoch),
        samples_per_epoch=samples_per_epoch,
    )


def save_recipe(r: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"# resolved recipe (from {r.source})\n" + yaml.safe_dump(r.to_dict(), sort_keys=False))
    tmp.replace(path)
