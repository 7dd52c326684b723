"""The implementations users run today, timed as a bare step on the same batch and precision.

``official``: facebookresearch/mae's ``models_mae`` (timm blocks), from a checkout passed as
``--mae-src`` (never part of this repository), with its two shims against today's libraries:
timm's ``Block`` no longer takes ``qk_scale``, and numpy's ``np.float`` alias is gone.
``hf``: Hugging Face ``transformers``' ``ViTMAEForPreTraining`` (SDPA attention).
Both: forward + backward + fused AdamW, bf16 autocast on a GPU, optionally ``torch.compile``d.

    python -m mimscale.bench.peers {official,hf} [--mae-src DIR] [--size large] [--batch 256]
        [--steps 10] [--compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from mimscale.bench.common import emit, sync

# (embed dim, depth, heads) of the ViT encoders; every peer uses MAE's 8 x 512 decoder (16 heads).
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
         "huge": (1280, 32, 16)}  # fmt: skip
# A CPU smoke size: a few layers and small dims, so the whole step takes milliseconds.
SMOKE = (64, 2, 4)


def shim_official() -> None:
    """Make facebookresearch/mae importable against today's numpy and timm (its two shims)."""
    import numpy as np
    import timm.models.vision_transformer as vt

    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]  # removed alias, used by its pos-embed code
    if getattr(vt.Block, "_mimscale_shim", False):
        return
    orig = vt.Block.__init__

    def init(self, *args: Any, qk_scale: Any = None, **kw: Any) -> None:  # qk_scale: always None there
        orig(self, *args, **kw)

    vt.Block.__init__ = init  # type: ignore[method-assign]
    vt.Block._mimscale_shim = True  # type: ignore[attr-defined]


def build_official(src: str, size: str, patch: int, img: int, smoke: bool) -> torch.nn.Module:
    """The official MAE model of ``size`` (norm-pix loss, as its pre-training recipe)."""
    from functools import partial

    shim_official()
    sys.path.insert(0, src)
    import models_mae  # noqa: PLC0415  (from the checkout given on the command line)

    dim, depth, heads = SMOKE if smoke else SIZES[size]
    dec = (32, 1, 4) if smoke else (512, 8, 16)
    return models_mae.MaskedAutoencoderViT(
        img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        decoder_embed_dim=dec[0], decoder_depth=dec[1], decoder_num_heads=dec[2], mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=True,
    )  # fmt: skip


def build_hf(size: str, patch: int, img: int, smoke: bool) -> torch.nn.Module:
    """``ViTMAEForPreTraining`` of ``size`` with MAE's decoder, SDPA attention."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    dim, depth, heads = SMOKE if smoke else SIZES[size]
    dec = (32, 1, 4) if smoke else (512, 8, 16)
    cfg = ViTMAEConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
        decoder_hidden_size=dec[0], decoder_num_hidden_layers=dec[1], decoder_num_attention_heads=dec[2],
        decoder_intermediate_size=4 * dec[0], image_size=img, patch_size=patch, mask_ratio=0.75,
        norm_pix_loss=True, attn_implementation="sdpa",
    )  # fmt: skip
    return ViTMAEForPreTraining(cfg)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Median bare-step time of the chosen peer; the JSON-able report."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if a.impl == "official":
        if not a.mae_src:
            raise SystemExit("peers official: --mae-src (a facebookresearch/mae checkout) is required")
        model = build_official(a.mae_src, a.size, a.patch, a.img, a.smoke)
        step_loss = lambda m, x: m(x, mask_ratio=0.75)[0]  # noqa: E731
    else:
        model = build_hf(a.size, a.patch, a.img, a.smoke)
        step_loss = lambda m, x: m(pixel_values=x).loss  # noqa: E731
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    fwd = torch.compile(model) if a.compile else model
    x = torch.randn(a.batch, 3, a.img, a.img, device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = step_loss(fwd, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    out: dict[str, Any] = {"impl": a.impl, "compiled": a.compile, "size": a.size, "batch": a.batch,
                           "device": str(dev), "bare_step_s": step, "images_per_s": a.batch / step,
                           "loss_finite": bool(torch.isfinite(loss.detach()).item())}  # fmt: skip
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m mimscale.bench.peers ...`` (module docstring)."""
    p = argparse.ArgumentParser(prog="mimscale.bench.peers", description=__doc__)
    p.add_argument("impl", choices=["official", "hf"])
    p.add_argument("--mae-src", default=None)
    p.add_argument("--size", default="large", choices=sorted(SIZES))
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a tiny model (CPU end-to-end check)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a), a.out)


if __name__ == "__main__":
    sys.exit(main())
