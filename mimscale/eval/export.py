"""``mimscale export CKPT OUT.safetensors``: the encoder with timm's key names.

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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_encoder", "load_exported", "main"]

PREFIX = "encoder.vit."


def export_encoder(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the checkpoint's encoder as a timm-keyed safetensors file.

    Works from any ZeRO stage (consolidated by :func:`mimscale.eval.ckpt.method_state_dict`),
    for pre-training and fine-tuning checkpoints alike (the classifier head is not exported).

    Args:
        ckpt: run dir, checkpoints dir or tag dir.
        out: destination ``.safetensors``.

    Returns:
        The metadata: ``timm_name``, ``timm_kwargs``, ``num_tensors``, ``source``.

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
    kwargs = {k: v for k, v in enc.timm_kwargs.items() if k != "drop_path_rate"}
    model = timm.create_model(enc.timm_name, **kwargs)
    model.load_state_dict(weights, strict=True)  # refuse to write a file timm cannot load
    ckpt_dir, tag = resolve_checkpoint(ckpt)
    meta = {
        "timm_name": enc.timm_name,
        "timm_kwargs": kwargs,
        "num_tensors": len(weights),
        "source": str(ckpt_dir / tag),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={k: json.dumps(v) for k, v in meta.items()})
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
        overlay = dict(file=str(path), num_classes=0)
        return timm.create_model(meta["timm_name"], pretrained=True, pretrained_cfg_overlay=overlay,
                                 **meta["timm_kwargs"])  # fmt: skip
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    """CLI: ``mimscale export CKPT OUT.safetensors``."""
    p = argparse.ArgumentParser(prog="mimscale export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("ckpt", help="run dir, checkpoints dir or tag dir")
    p.add_argument("out", help="destination .safetensors")
    args = p.parse_args(argv)
    meta = export_encoder(args.ckpt, args.out)
    kw = ", ".join(f"{k}={v!r}" for k, v in meta["timm_kwargs"].items())
    print(json.dumps({"out": str(args.out), **meta}))
    print(
        f"load: timm.create_model({meta['timm_name']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(args.out)!r}, num_classes=0), {kw})"
    )
    return 0
