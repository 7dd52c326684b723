"""``mimscale export CKPT OUT.safetensors [--hf DIR]``: the encoder with timm's key names.

The encoder's inner module is a real timm model, so its ``state_dict`` *is* the timm checkpoint
(the fixed sin-cos ``pos_embed`` is stored as timm's ``pos_embed``; MIM-only parameters such as
``mask_token`` are dropped). Load it with::

    timm.create_model('vit_base_patch16_224', pretrained=True,
                      pretrained_cfg_overlay=dict(file='OUT.safetensors', num_classes=0))

(``vit_tiny/small/large_patch16_224``, ``vit_huge_patch14_224`` for the other sizes). For
non-default shapes (CPU models, CAE v2's 12-head ViT-T, BEiT arch, no abs. pos-embed) pass the
keyword arguments stored in the file's metadata (``timm_kwargs``; printed by the command), e.g.
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=OUT, num_classes=0),
**timm_kwargs)``: then every key loads strictly and ``model.forward_features(x)`` equals the
mimscale encoder's output ``x`` (all tokens, after the final norm).

The file's metadata also holds a ``pretrained_cfg`` that matches mimscale's evaluation
preprocessing -- ImageNet mean/std (not the 0.5/0.5/0.5 of timm's augreg ``vit_*`` defaults), the
input size, resize-256/centre-crop-224 (``crop_pct`` 0.875) and the view's interpolation -- and
the pooling the run was probed with (``global_pool``: ``token`` for cls, ``avg`` for the mean of the
normed patch tokens). Pass it as the overlay (``load_exported`` and the printed command do) and
``timm.data.resolve_model_data_config(model)`` returns that preprocessing. ``--hf DIR`` also writes
the Hugging Face layout through timm's own ``save_for_hf`` (``config.json`` + ``model.safetensors``),
loadable with ``timm.create_model('local-dir:DIR', pretrained=True)``. Written files are 0644.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_encoder", "load_exported", "main"]

PREFIX = "encoder.vit."


def pretrained_cfg(recipe: Any) -> dict[str, Any]:
    """The timm ``pretrained_cfg`` fields of mimscale's evaluation preprocessing for ``recipe``."""
    from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
    from mimscale.data.transforms import CENTER_CROP_FRACTION

    size = recipe.model.img_size
    views = getattr(recipe.data, "views", None)
    return {
        "input_size": [3, size, size],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": CENTER_CROP_FRACTION,  # resize so a 0.875 centre crop lands on img_size
        "crop_mode": "center",
        "interpolation": views[0].interpolation if views else "bicubic",
    }


def probe_pool(recipe: Any) -> str:
    """``cls`` or ``mean``: how the run's features were pooled (fine-tune head, else ``eval.pool``)."""
    cfg = recipe.method_cfg
    if recipe.method == "finetune" and cfg is not None:
        return "mean" if cfg.pool == "avg" else "cls"
    ev = recipe.eval
    return getattr(ev, "pool", "cls") or "cls"


def _pool_kwargs(arch: str, pool: str) -> dict[str, Any]:
    """timm kwargs whose ``forward_head`` pools as mimscale did, keeping the same state-dict keys.

    ``avg`` makes timm swap the final norm for an ``fc_norm`` after pooling unless ``fc_norm=False``
    (VisionTransformer only); Beit has no such switch, so a mean-probed Beit keeps ``token`` pooling
    in its kwargs and records ``pool: mean`` in the metadata.
    """
    if pool == "mean" and arch == "vit":
        return {"global_pool": "avg", "fc_norm": False}
    return {"global_pool": "token"}


def stock_differences(timm_name: str, weights: dict[str, torch.Tensor]) -> list[str]:
    """The tensors whose name or shape differ from timm's stock ``timm_name`` (empty: a stock shape).

    A CPU-tiny or 12-head ViT-T encoder carries a stock model's name for its family; loading it
    with ``timm.create_model(timm_name)`` alone then fails on every one of these tensors.
    """
    import timm

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        stock = {
            k: tuple(v.shape) for k, v in timm.create_model(timm_name, num_classes=0).state_dict().items()
        }
    ours = {k: tuple(v.shape) for k, v in weights.items()}
    return sorted(k for k in stock.keys() | ours.keys() if stock.get(k) != ours.get(k))


def _chmod_tree(*paths: Path) -> None:
    for p in paths:
        for f in [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]:
            f.chmod(0o644)  # group/world-readable, as any shared model file should be


def export_encoder(ckpt: str | Path, out: str | Path, hf_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the checkpoint's encoder as a timm-keyed safetensors file.

    Works from any ZeRO stage (consolidated by :func:`mimscale.eval.ckpt.method_state_dict`),
    for pre-training and fine-tuning checkpoints alike (the classifier head is not exported).

    Args:
        ckpt: run dir, checkpoints dir or tag dir.
        out: destination ``.safetensors``.
        hf_dir: also write the Hugging Face layout (timm ``save_for_hf``) into this folder.

    Returns:
        The metadata: ``timm_name``, ``timm_kwargs``, ``pretrained_cfg``, ``pool``,
        ``num_tensors``, ``source``.

    Raises:
        RuntimeError: the weights do not load strictly into the timm model they claim to be.
    """
    import timm
    from safetensors.torch import save_file

    from mimscale.eval.ckpt import method_state_dict, resolve_checkpoint
    from mimscale.eval.runs import recipe_of
    from mimscale.models.vit import ViTEncoder

    recipe = recipe_of(ckpt)
    sd = method_state_dict(ckpt)
    weights = {k[len(PREFIX) :]: v.contiguous() for k, v in sd.items() if k.startswith(PREFIX)}
    if not weights:
        raise RuntimeError(f"{ckpt}: no '{PREFIX}*' weights in the checkpoint (is it a mimscale method?)")
    enc = ViTEncoder(recipe.model)
    pool = probe_pool(recipe)
    kwargs = {k: v for k, v in enc.timm_kwargs.items() if k != "drop_path_rate"}
    kwargs.update(_pool_kwargs(recipe.model.arch, pool))
    cfg = pretrained_cfg(recipe)
    model = timm.create_model(enc.timm_name, pretrained_cfg_overlay=dict(num_classes=0, **cfg), **kwargs)
    model.load_state_dict(weights, strict=True)  # refuse to write a file timm cannot load
    ckpt_dir, tag = resolve_checkpoint(ckpt)
    differ = stock_differences(enc.timm_name, weights)
    meta = {
        "timm_name": enc.timm_name,
        # stored and printed beside the name: a non-stock shape loads only with timm_kwargs
        "stock_shape": not differ,
        "shape_note": (
            f"NOT the stock {enc.timm_name}: {len(differ)} tensors differ in name or shape "
            f"(first: {differ[0]}); timm.create_model({enc.timm_name!r}) loads it only with **timm_kwargs"
            if differ
            else f"the stock {enc.timm_name} shape"
        ),
        "timm_kwargs": kwargs,
        "pretrained_cfg": cfg,
        "pool": pool,
        "num_tensors": len(weights),
        "source": str(ckpt_dir / tag),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={k: json.dumps(v) for k, v in meta.items()})
    _chmod_tree(Path(out))
    if hf_dir is not None:
        from timm.models import save_for_hf

        save_for_hf(model, str(hf_dir), model_args=kwargs, safe_serialization=True)
        _chmod_tree(Path(hf_dir))
    return meta


def load_exported(path: str | Path, pretrained_overlay: bool = True) -> torch.nn.Module:
    """Build the timm model named in an exported file's metadata and load it (strict keys).

    Args:
        path: the exported ``.safetensors``.
        pretrained_overlay: load through ``timm.create_model(pretrained=True,
            pretrained_cfg_overlay=dict(file=path, num_classes=0))`` (timm's own loader), else
            through ``load_state_dict(strict=True)``.
    """
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if "timm_name" not in meta:
        raise ValueError(f"{path}: no timm_name in the metadata (not written by mimscale export)")
    if pretrained_overlay:
        overlay = dict(file=str(path), num_classes=0, **meta.get("pretrained_cfg", {}))
        return timm.create_model(meta["timm_name"], pretrained=True, pretrained_cfg_overlay=overlay,
                                 **meta["timm_kwargs"])  # fmt: skip
    overlay = dict(num_classes=0, **meta.get("pretrained_cfg", {}))
    model = timm.create_model(meta["timm_name"], pretrained_cfg_overlay=overlay, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    """CLI: ``mimscale export CKPT OUT.safetensors``."""
    p = argparse.ArgumentParser(prog="mimscale export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("ckpt", help="run dir, checkpoints dir or tag dir")
    p.add_argument("out", help="destination .safetensors")
    p.add_argument("--hf", default=None, help="also write the Hugging Face layout into this folder")
    args = p.parse_args(argv)
    from mimscale.eval.ckpt import stdout_to_stderr

    with stdout_to_stderr():  # DeepSpeed's consolidation chatter: stdout is the result
        meta = export_encoder(args.ckpt, args.out, args.hf)
    if not meta["stock_shape"]:
        print(f"mimscale export: {meta['shape_note']}", file=sys.stderr)
    kw = ", ".join(f"{k}={v!r}" for k, v in meta["timm_kwargs"].items())
    cfg = ", ".join(f"{k}={v!r}" for k, v in meta["pretrained_cfg"].items())
    print(json.dumps({"out": str(args.out), **meta}))
    print(
        f"load{'' if meta['stock_shape'] else ' (non-stock shape: the kwargs are required)'}: "
        f"timm.create_model({meta['timm_name']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(args.out)!r}, num_classes=0, {cfg}), {kw})"
    )
    if args.hf:
        print(f"load: timm.create_model('local-dir:{args.hf}', pretrained=True)")
    return 0
