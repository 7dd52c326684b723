"""Build a teacher tower (timm ViT or open_clip CLIP vision tower) and wrap it as a TeacherViT.

Three sources, one result:

- a weights **file**: the tower is built with the architecture read from the file
  (:func:`mimscale.teachers.weights.read_file_arch`) and loaded strictly from it; the stored
  position embedding is resampled (bicubic, antialiased, as timm / open_clip do) when the
  teacher's grid differs, and the patch embedding only when ``teacher.resize_patch_embed`` asks;
- a **tag** (open_clip) or timm name resolved in the local cache: the libraries' own loaders;
- nothing, with ``teacher.allow_random``: a random tower shaped by the ``teacher.width/...`` keys.

Returns the input normalisation too: the recipe's ``teacher.mean/std``, else the weights' own
(open_clip's preprocess config, timm's ``pretrained_cfg``) -- with a warning for a file, which
carries no such config.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mimscale.config import RecipeError, TeacherConfig
from mimscale.teachers.weights import FileArch, load_state

if TYPE_CHECKING:
    from mimscale.models.teacher_vit import TeacherViT

# The (unused) text tower of an open_clip teacher built here: only the vision tower is kept.
TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _log(msg: str) -> None:
    print(f"[mimscale] teacher: {msg}", file=sys.stderr, flush=True)


def resample_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1 + g*g, C]`` position embedding (class slot first) -> ``[1 + grid*grid, C]``.

    Bicubic with antialiasing, as ``open_clip.resize_pos_embed`` and timm's
    ``resample_abs_pos_embed`` do when they load weights at another resolution.
    """
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if g == grid:
        return pos
    x = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:1], x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)])


def _resize_patch(weight: torch.Tensor, patch: int, cfg: TeacherConfig, key: str) -> torch.Tensor:
    """A file's patch embedding at ``teacher.patch_size`` when that differs (an explicit choice)."""
    if cfg.patch_size is None or cfg.patch_size == weight.shape[-1]:
        return weight
    from timm.layers import resample_patch_embed

    _log(f"resampling the file's {key} from patch {weight.shape[-1]} to {cfg.patch_size} "
         "(teacher.resize_patch_embed: true)")  # fmt: skip
    return resample_patch_embed(weight, [cfg.patch_size, cfg.patch_size])


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``load_state_dict(strict=True)``, its failure turned into one recipe error naming keys."""
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = str(e).split("\n\t", 1)[-1].replace("\n\t", "; ")[:600]
        raise RecipeError(f".teacher.model: {path} does not load into {what}: {detail}") from None


def _heads(cfg: TeacherConfig, width: int, default_head_dim: int) -> int:
    """``teacher.heads``, else ``width / head dim`` (shapes do not give the head count)."""
    if cfg.heads is not None:
        if width % cfg.heads:
            raise RecipeError(f".teacher.heads: {cfg.heads} heads do not divide the file's width {width}")
        return cfg.heads
    if width % default_head_dim:
        raise RecipeError(
            f".teacher.heads: the file's width {width} is not a multiple of {cfg.model}'s head width "
            f"{default_head_dim}; set teacher.heads"
        )
    return width // default_head_dim


def _open_clip_tower(
    cfg: TeacherConfig, weights: str | None, img_size: int | None, arch: FileArch | None
) -> tuple[Any, list[float], list[float]]:
    """``(visual, mean, std)``; ``img_size`` None keeps the model's native resolution."""
    import open_clip

    mcfg = open_clip.get_model_config(cfg.model)
    if mcfg is None:
        raise RecipeError(f".teacher.model: unknown open_clip model {cfg.model!r}")
    kw: dict[str, Any] = {}
    sizes: dict[str, Any] = (
        {k: getattr(arch, k) for k in ("width", "depth", "patch_size", "out_dim")} if arch else {}
    )
    sizes = sizes or cfg.arch_overrides()
    if sizes:  # built from the file's shapes, or a tiny random tower from the teacher keys
        vision: dict[str, Any] = dict(mcfg["vision_cfg"])
        width = int(sizes.get("width", vision["width"]))
        head_dim = int(vision.get("head_width", 64))
        if arch is not None:
            heads = _heads(cfg, width, head_dim)
        else:
            heads = sizes.get("heads", max(1, width // head_dim))
        vision.update(width=width, layers=sizes.get("depth", vision["layers"]), head_width=width // heads,
                      patch_size=cfg.patch_size or sizes.get("patch_size", vision["patch_size"]),
                      image_size=img_size or vision["image_size"])  # fmt: skip
        if arch:
            vision["mlp_ratio"] = arch.mlp_ratio
        kw = dict(embed_dim=sizes.get("out_dim") or mcfg["embed_dim"], vision_cfg=vision,
                  text_cfg=dict(TINY_TEXT_CFG))  # fmt: skip
    tag_file = weights if arch is None else None
    quick = bool(open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained).get("quick_gelu", False))
    model = open_clip.create_model(
        cfg.model, pretrained=tag_file, force_quick_gelu=quick, force_image_size=img_size,
        cache_dir=cfg.cache_dir, **kw,
    )  # fmt: skip
    if arch is not None and weights is not None:
        sd = {k.removeprefix("visual."): v for k, v in load_state(weights).items() if k.startswith("visual.")}
        sd["positional_embedding"] = resample_grid(sd["positional_embedding"], model.visual.grid_size[0])
        sd["conv1.weight"] = _resize_patch(sd["conv1.weight"], arch.patch_size, cfg, "visual.conv1.weight")
        _load_strict(model.visual, sd, weights, f"open_clip {cfg.model}'s vision tower")
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = list(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = list(pre.get("std", open_clip.OPENAI_DATASET_STD))
    return model.visual, mean, std


def _timm_tower(
    cfg: TeacherConfig, weights: str | None, img_size: int | None, arch: FileArch | None
) -> tuple[Any, list[float], list[float]]:
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    kw: dict[str, Any] = {}
    if arch is not None:  # every size from the file; heads from teacher.heads or the head width
        with torch.device("meta"):
            named: Any = timm.create_model(cfg.model, pretrained=False, num_classes=0)
        attn: Any = getattr(named.blocks[0], "attn", None)  # 64, timm's usual head width, when unknown
        head_dim = named.embed_dim // attn.num_heads if hasattr(attn, "num_heads") else 64
        kw = dict(arch.extras)
        kw.update(embed_dim=arch.width, depth=arch.depth, num_heads=_heads(cfg, arch.width, head_dim),
                  patch_size=cfg.patch_size or arch.patch_size, mlp_ratio=arch.mlp_ratio)  # fmt: skip
    else:
        names = {"width": "embed_dim", "depth": "depth", "heads": "num_heads", "patch_size": "patch_size"}
        kw = {names[k]: v for k, v in cfg.arch_overrides().items() if k in names}
    if img_size is not None:
        kw["img_size"] = img_size  # timm resamples a loaded pos-embed to the new grid
    if weights is not None and arch is None:
        kw.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
    vit: Any = timm.create_model(cfg.model, num_classes=0, **kw)
    if arch is not None and weights is not None:
        sd = {k: v for k, v in load_state(weights).items() if not k.startswith(("head.", "fc_norm."))}
        pos = sd["pos_embed"][0]
        sd["pos_embed"] = resample_grid(pos, vit.patch_embed.grid_size[0])[None]
        sd["patch_embed.proj.weight"] = _resize_patch(sd["patch_embed.proj.weight"], arch.patch_size, cfg,
                                                      "patch_embed.proj.weight")  # fmt: skip
        _load_strict(vit, sd, weights, f"timm {cfg.model} built with the file's sizes")
    dc = vit.pretrained_cfg or {}
    return vit, list(dc.get("mean", IMAGENET_DEFAULT_MEAN)), list(dc.get("std", IMAGENET_DEFAULT_STD))


def build_tower(
    cfg: TeacherConfig, weights: str | None, img_size: int | None, arch: FileArch | None = None
) -> tuple[TeacherViT, list[float], list[float]]:
    """The frozen :class:`TeacherViT` and the input ``(mean, std)`` it is fed with.

    Args:
        cfg: the ``teacher`` section.
        weights: a weights path (file or cache hit), or None for a random tower.
        img_size: the teacher resolution (its grid equals the student's); None: native.
        arch: the file's architecture when ``weights`` is a user's file (built from it).

    Raises:
        RecipeError: a block count past the teacher's depth, or weights that do not load.
    """
    from mimscale.models.teacher_vit import TeacherViT

    if cfg.kind == "open_clip":
        visual, mean, std = _open_clip_tower(cfg, weights, img_size, arch)
        depth = len(visual.transformer.resblocks)
    else:
        visual, mean, std = _timm_tower(cfg, weights, img_size, arch)
        depth = len(visual.blocks)
    layer = depth if cfg.layer == -1 else cfg.layer
    if layer > depth:
        raise RecipeError(f".teacher.layer: {cfg.layer} exceeds the teacher's {depth} blocks")
    try:
        if cfg.kind == "open_clip":
            model = TeacherViT.from_open_clip(visual, layer, cfg.norm, cfg.proj)
        else:
            model = TeacherViT.from_timm(visual, layer, cfg.norm)
    except ValueError as e:  # an unsupported tower variant, named by the adapter
        raise RecipeError(f".{e}") from None
    if cfg.mean is not None:
        return model, list(cfg.mean), list(cfg.std or std)
    if arch is not None:
        _log(f"WARNING: teacher.mean/std not set; the weights file carries no normalisation, so the "
             f"{cfg.kind} defaults for {cfg.model} are used (mean={mean}, std={std}). If the teacher was "
             "trained on other inputs, set teacher.mean and teacher.std.")  # fmt: skip
    return model, mean, std


def patch_of(cfg: TeacherConfig, arch: FileArch | None) -> int:
    """The teacher's patch size (recipe key, else the file's, else the named model's), unbuilt."""
    if cfg.patch_size is not None:
        return cfg.patch_size
    if arch is not None:
        return arch.patch_size
    if cfg.kind == "open_clip":
        import open_clip

        mcfg = open_clip.get_model_config(cfg.model)
        if mcfg is None:
            raise RecipeError(f".teacher.model: unknown open_clip model {cfg.model!r}")
        return int(mcfg["vision_cfg"]["patch_size"])
    import timm

    with torch.device("meta"):
        model: Any = timm.create_model(cfg.model, pretrained=False)
        return int(model.patch_embed.patch_size[0])
