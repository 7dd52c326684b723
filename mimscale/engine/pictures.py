"""Reconstruction pictures during training: what a pixel method predicts, every N steps.

One grid per picture step (``train.recon_every``), one column per sample, four rows: the input,
the input with its masked patches greyed out, the prediction, and the prediction on the masked
patches with the visible ones pasted back (MAE's figure 2). The samples are the first
``train.recon_images`` valid rows of that step's last micro-batch; the method runs without
gradient, in eval mode and under a forked RNG, so a picture step trains exactly as any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimscale.methods.base import Method, Reconstruction

__all__ = ["first_rows", "reconstruct_rows", "reconstruction_grid", "save_png", "write_reconstruction"]

GREY = 0.5  # the masked patches of the second row, on the 0-1 scale


def first_rows(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The collated ``batch`` cut to its first ``n`` valid rows (masks, views or JPEGs, keys alike)."""
    from mimscale.engine.setup import keep_valid_rows

    size = len(batch["keys"])
    valid = batch.get("valid", torch.ones(size, dtype=torch.bool))
    if not bool(valid.any()):  # nothing real to show: the padding rows stand in
        valid = torch.ones(size, dtype=torch.bool)
    keep = valid & (valid.long().cumsum(0) <= n)
    out = keep_valid_rows({**batch, "valid": keep})
    if "device_decode" in out:  # data.decode: gpu: the step already counted any bad image once
        out["device_decode"] = dataclasses.replace(out["device_decode"], on_bad=_already_counted)
    return out


def _already_counted(key: str, error: BaseException) -> None:
    """A picture decodes rows the training step decoded (and counted, or failed on) already."""


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[B, 3, H, W]`` -> float32 in [0, 1] on the CPU."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0.0, 1.0)


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """bool ``[B, N]`` patch mask -> bool ``[B, 1, h*p, w*p]`` pixel mask (True = masked)."""
    m = mask.detach().cpu().reshape(mask.shape[0], 1, *grid)
    return m.repeat_interleave(p, 2).repeat_interleave(p, 3)


def reconstruction_grid(rec: Reconstruction, patch_size: int, pad: int = 2) -> np.ndarray:
    """The picture of ``rec``: uint8 ``[H, W, 3]``, a column per sample and four rows (input,
    masked input, prediction, prediction on the masked patches + the visible input)."""
    from torchvision.utils import make_grid

    x, pred = to_unit(rec.images), to_unit(rec.pred)
    h, w = x.shape[2] // patch_size, x.shape[3] // patch_size
    m = pixel_mask(rec.mask, (h, w), patch_size)
    rows = [x, torch.where(m, GREY, x), pred, torch.where(m, pred, x)]
    grid = make_grid(torch.cat(rows), nrow=x.shape[0], padding=pad, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write ``image`` (uint8 ``[H, W, 3]``) as a PNG, atomically (a picture is never half written)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path


@torch.no_grad()
def reconstruct_rows(method: Method, batch: dict[str, Any], targets: Any) -> Reconstruction:
    """``method.reconstruct`` on a prepared batch, in eval mode (no dropout or drop-path), the
    caller's RNG streams untouched (a focused mask draws from them) and the mode restored."""
    device = batch["images"][0].device
    was_training = method.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        method.eval()
        try:
            return method.reconstruct(batch, batch["mask"], targets)
        finally:
            method.train(was_training)


def write_reconstruction(trainer: Any, raw: dict[str, Any]) -> Path | None:
    """The picture of the first rows of ``raw`` (a collated micro-batch of this step) at the
    trainer's step. Collective: every rank runs the method (ZeRO-3 gathers parameters); rank 0
    writes ``run_dir/images/recon_step<step>.png``, logs it, and returns its path."""
    from mimscale.engine.setup import prepare_batch

    recipe, dist = trainer.recipe, trainer.dist
    batch = prepare_batch(first_rows(raw, recipe.train.recon_images), dist.device, trainer.dtype)
    targets = trainer.targets_fn(batch) if trainer.targets_fn is not None else None
    rec = reconstruct_rows(trainer.method, batch, targets)
    if dist.rank != 0:
        return None
    step = trainer.state.step
    png = save_png(
        reconstruction_grid(rec, trainer.method.encoder.patch_size),
        trainer.run_dir / "images" / f"recon_step{step:08d}.png",
    )
    rows = "input, masked, prediction, prediction + visible"
    trainer.logger.log_image("recon", png, step, f"{recipe.run.name} step {step}: {rows}")
    return png
