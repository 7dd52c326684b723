"""Where a teacher's weights are, and what architecture a weights file describes.

Weights are looked up on local disk only (training never downloads): a file path, or an
open_clip tag / timm name in the local open_clip or Hugging Face cache.

A weights file carries its architecture in its tensor shapes, so the teacher is built from the
file (:func:`read_file_arch`), not from the ``teacher.width/depth/...`` keys, which describe a
tiny *random* teacher. A key that is set must agree with the file; a disagreement is one
:class:`RecipeError` that names every such key with the file's value (never a size-mismatch
traceback from inside timm / open_clip). The one thing shapes do not give, the number of
attention heads, comes from ``teacher.heads`` or else from the named model's head width.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mimscale.config import RecipeError, TeacherConfig

# open_clip files that hold full CLIP weights in a Hugging Face repo (safetensors preferred).
_HF_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys that tell the two layouts apart (timm ViT vs open_clip CLIP vision tower).
_TIMM_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight")
_CLIP_KEYS = ("visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight")


def missing_weights(cfg: TeacherConfig, looked: list[str]) -> RecipeError:
    """The error for weights that are not on disk, listing every place looked at."""
    where = "\n  ".join(looked)
    return RecipeError(
        f".teacher.pretrained: no weights for teacher {cfg.kind}:{cfg.model} ({cfg.pretrained!r}); looked in:"
        f"\n  {where}\nPut the file there, set teacher.pretrained to a weights file, or (tests / CPU demo "
        f"only) set teacher.allow_random: true."
    )


def as_file(pretrained: str) -> Path | None:
    """A file path (anything with a separator or a weights suffix), else None (a tag)."""
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return Path(pretrained).expanduser()
    return None


def _hf_cached(repo: str, files: tuple[str, ...], cache_dir: str | None, looked: list[str]) -> str | None:
    from huggingface_hub import constants, try_to_load_from_cache

    for name in files:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(hit, str):
            return hit
        looked.append(f"Hugging Face cache {cache_dir or constants.HF_HUB_CACHE}: {repo}/{name}")
    return None


def resolve_weights(cfg: TeacherConfig) -> tuple[str | None, list[str]]:
    """Find the teacher's weights on local disk only (never downloads during training).

    Returns:
        ``(path or None, the places looked at)``.

    Raises:
        RecipeError: for an unknown open_clip tag.
    """
    looked: list[str] = []
    file = as_file(cfg.pretrained)
    if file is not None:
        looked.append(str(file))
        return (str(file) if file.is_file() else None), looked
    if cfg.arch_overrides():
        looked.append(f"nowhere: architecture overrides do not fit the {cfg.pretrained!r} weights")
        return None, looked
    if cfg.kind == "open_clip":
        import open_clip

        pcfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
        if not pcfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(cfg.model)) or "none"
            raise RecipeError(
                f".teacher.pretrained: unknown tag {cfg.pretrained!r} for {cfg.model} (known: {tags})"
            )
        if pcfg.get("hf_hub"):  # "org/repo/file" or "org/repo/" (open_clip's default file names)
            repo, name = os.path.split(pcfg["hf_hub"])
            hit = _hf_cached(repo, (name,) if name else _HF_CLIP_FILES, cfg.cache_dir, looked)
            if hit:
                return hit, looked
        if pcfg.get("url"):
            target = Path(cfg.cache_dir or "~/.cache/clip").expanduser() / os.path.basename(pcfg["url"])
            looked.append(str(target))
            if target.is_file():
                return str(target), looked
        return None, looked
    import timm

    pcfg = timm.models.get_pretrained_cfg(cfg.model)
    hub = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if hub:
        return _hf_cached(hub, _HF_TIMM_FILES, cfg.cache_dir, looked), looked
    looked.append(f"timm pretrained config of {cfg.model} (no Hugging Face id)")
    return None, looked


# --------------------------------------------------------------------------- a file's architecture


def load_state(path: str) -> dict[str, torch.Tensor]:
    """A weights file's tensors (safetensors or a ``weights_only`` torch file), unwrapped.

    A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a ``module.`` prefix (DDP) are
    removed, as timm's and open_clip's own loaders do.

    Raises:
        RecipeError: the file is not a readable state dict (e.g. a TorchScript archive).
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is one clear recipe error
        why = f"{type(e).__name__}: {e}"
        raise RecipeError(f".teacher.pretrained: {path} is not a readable state dict ({why})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RecipeError(f".teacher.pretrained: {path} holds no tensor state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@dataclass(frozen=True)
class FileArch:
    """The architecture a teacher weights file describes (from its tensor shapes).

    Attributes:
        kind: "timm" or "open_clip" (the file's key layout).
        width: token channels. depth: blocks. patch_size: p. grid: the stored pos-embed grid.
        mlp_ratio: MLP hidden / width. out_dim: open_clip ``proj`` output (None: no proj / timm).
        extras: timm constructor flags the keys imply (qkv_bias, init_values, pre_norm, qk_norm).
    """

    kind: str
    width: int
    depth: int
    patch_size: int
    grid: int
    mlp_ratio: float
    out_dim: int | None
    extras: tuple[tuple[str, Any], ...] = ()


def _depth(keys: list[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in keys if (m := pat.match(k))), default=-1)


def _grid(n_tokens: int, path: str, key: str) -> int:
    g = int(round((n_tokens - 1) ** 0.5))
    if g * g != n_tokens - 1:
        raise RecipeError(f".teacher.pretrained: {path}: {key} has {n_tokens} rows, not 1 + a square grid")
    return g


def _timm_arch(sd: dict[str, torch.Tensor], path: str) -> FileArch:
    keys = list(sd)
    width, depth = sd["cls_token"].shape[-1], _depth(keys, "blocks.")
    extras: dict[str, Any] = {"qkv_bias": "blocks.0.attn.qkv.bias" in sd, "pre_norm": "norm_pre.weight" in sd,
              "qk_norm": "blocks.0.attn.q_norm.weight" in sd}  # fmt: skip
    if "blocks.0.ls1.gamma" in sd:
        extras["init_values"] = 1.0  # layer scale present; its values come from the file
    return FileArch(
        kind="timm",
        width=int(width),
        depth=depth,
        patch_size=int(sd["patch_embed.proj.weight"].shape[-1]),
        grid=_grid(sd["pos_embed"].shape[1], path, "pos_embed"),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
        out_dim=None,
        extras=tuple(sorted(extras.items())),
    )


def _clip_arch(sd: dict[str, torch.Tensor], path: str) -> FileArch:
    keys = list(sd)
    width = int(sd["visual.conv1.weight"].shape[0])
    proj = sd.get("visual.proj")
    return FileArch(
        kind="open_clip",
        width=width,
        depth=_depth(keys, "visual.transformer.resblocks."),
        patch_size=int(sd["visual.conv1.weight"].shape[-1]),
        grid=_grid(sd["visual.positional_embedding"].shape[0], path, "visual.positional_embedding"),
        mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        out_dim=int(proj.shape[1]) if proj is not None else None,
    )


@lru_cache(maxsize=8)
def _arch_cached(path: str, mtime: float) -> FileArch:
    sd = load_state(path)
    if all(k in sd for k in _TIMM_KEYS):
        return _timm_arch(sd, path)
    if all(k in sd for k in _CLIP_KEYS):
        return _clip_arch(sd, path)
    raise RecipeError(
        f".teacher.pretrained: {path} is neither a timm ViT ({', '.join(_TIMM_KEYS)}) nor an open_clip CLIP "
        f"({', '.join(_CLIP_KEYS)}) state dict; first keys: {', '.join(list(sd)[:5])}"
    )


def read_file_arch(path: str, cfg: TeacherConfig) -> FileArch:
    """The file's architecture, checked against the recipe's ``teacher`` keys.

    Args:
        path: an existing weights file.
        cfg: the ``teacher`` section (its ``kind`` and any architecture keys that are set).

    Returns:
        The :class:`FileArch` read from the file's shapes.

    Raises:
        RecipeError: the file's layout is not ``teacher.kind``'s, or set architecture keys
            disagree with the file (all of them named, with the file's values).
    """
    arch = _arch_cached(path, os.path.getmtime(path))
    if arch.kind != cfg.kind:
        raise RecipeError(f".teacher.kind: {path} holds {arch.kind} weights; set teacher.kind={arch.kind}")
    from_file = {"width": arch.width, "depth": arch.depth, "patch_size": arch.patch_size}
    # out_dim: open_clip's proj output (its embed_dim, used or not); a timm ViT's width
    from_file["out_dim"] = (arch.out_dim or arch.width) if arch.kind == "open_clip" else arch.width
    wrong = {k: (v, from_file[k]) for k, v in cfg.arch_overrides().items() if from_file.get(k, v) != v}
    if "patch_size" in wrong and cfg.resize_patch_embed:
        del wrong["patch_size"]  # an explicit resize (logged when the tower is built)
    if wrong:
        said = ", ".join(f"teacher.{k}={v} (file: {f})" for k, (v, f) in wrong.items())
        nulls = " ".join(f"teacher.{k}=null" for k in wrong)
        hint = ""
        if "patch_size" in wrong:
            hint = " (or teacher.resize_patch_embed=true to resample the patch embedding)"
        raise RecipeError(
            f".teacher.{next(iter(wrong))}: the weights file {path} fixes the architecture, and {said} "
            f"disagree with it. Take it from the file: {nulls}{hint}"
        )
    if arch.kind == "open_clip" and cfg.proj and arch.out_dim is None:
        raise RecipeError(f".teacher.proj: {path} has no visual.proj; set teacher.proj=false")
    return arch


def file_arch(cfg: TeacherConfig) -> FileArch | None:
    """:func:`read_file_arch` when ``teacher.pretrained`` names an existing file, else None."""
    file = as_file(cfg.pretrained)
    return read_file_arch(str(file), cfg) if file is not None and file.is_file() else None
