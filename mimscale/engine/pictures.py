"""Reconstruction pictures during training: what a pixel method predicts, every N steps.

One grid per picture step (``train.recon_every``), one column per sample, four labelled rows: the
input, the input with its masked patches greyed out, the prediction, and the prediction on the
masked patches with the visible ones pasted back (MAE's figure 2). Cells are upscaled (nearest)
to at least :data:`MIN_CELL` pixels, so 32-px digits are readable at a glance.

The samples are a fixed set, as in the official MAE visualisation, so step 5k and step 50k show
the same inputs: the first ``train.recon_images`` images of the validation split when there is
one (else of the training data's first shard; always the training data with a precomputed
teacher, whose bank holds its targets), read once through the training loader's own layout
(views as center crops, masks and ``mask_noise``, ``data.decode``, the bank), and recorded in
``run_dir/images/recon_set.json``. The method runs without gradient, in eval mode, eagerly (a
compiled model is not recompiled for the picture's shapes) and under a forked RNG, so a picture
step trains exactly as any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimscale.methods.base import Method, Reconstruction

__all__ = [
    "first_rows",
    "label_rows",
    "picture_batch",
    "reconstruct_rows",
    "reconstruction_grid",
    "save_png",
    "write_reconstruction",
]

GREY = 0.5  # the masked patches of the second row, on the 0-1 scale
LABELS = ("input", "masked", "prediction", "prediction + visible")
MIN_CELL = 96  # pixels per cell at least: a 32-px digit is drawn 3x (nearest), readable at a glance


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


def reconstruction_grid(rec: Reconstruction, patch_size: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """The picture of ``rec``: uint8 ``[H, W, 3]``, a column per sample and four rows (input,
    masked input, prediction, prediction on the masked patches + the visible input), each image
    upscaled ``scale`` times (nearest: patches stay sharp squares)."""
    from torchvision.utils import make_grid

    x, pred = to_unit(rec.images), to_unit(rec.pred)
    h, w = x.shape[2] // patch_size, x.shape[3] // patch_size
    m = pixel_mask(rec.mask, (h, w), patch_size)
    rows = torch.cat([x, torch.where(m, GREY, x), pred, torch.where(m, pred, x)])
    if scale > 1:
        rows = rows.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(rows, nrow=x.shape[0], padding=pad, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def label_rows(grid: np.ndarray, labels: tuple[str, ...] = LABELS, pad: int = 2) -> np.ndarray:
    """``grid`` with a white column on its left naming each row (black text, vertically centred).

    Args:
        grid: uint8 ``[H, W, 3]`` of ``len(labels)`` equal rows, each with ``pad`` pixels above it.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    width = max(int(font.getlength(t)) for t in labels) + 12
    out = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), "white")
    out.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(out)
    row = (grid.shape[0] - pad) / len(labels)
    for i, text in enumerate(labels):
        draw.text((6, pad + (i + 0.5) * row), text, fill="black", font=font, anchor="lm")
    return np.asarray(out)


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
    """``method.reconstruct`` on a prepared batch, in eval mode (no dropout or drop-path), eagerly
    (``train.compile``'s blocks are not recompiled for the picture's batch size or for no_grad),
    the caller's RNG streams untouched and the mode restored."""
    device = batch["images"][0].device
    was_training = method.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _eager():
        method.eval()
        try:
            return method.reconstruct(batch, batch["mask"], targets)
        finally:
            method.train(was_training)


def _eager() -> Any:
    """Compiled modules run their eager code inside (torch >= 2.6). Older torch compiles the
    picture's shapes once: the fixed set has the same shapes at every picture, so once only."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def _picture_source(recipe: Any) -> tuple[str, str]:
    """``(recipe key, value)`` of the shards the fixed set comes from."""
    if recipe.data.val and recipe.teacher.source != "precomputed" and _readable(recipe.data.val):
        return "data.val", recipe.data.val
    return "data.train", recipe.data.train  # a precomputed teacher's bank covers the train shards


def _readable(where: str) -> bool:
    """Whether ``where`` names shards that exist: a recipe may keep a ``data.val`` that only its
    evaluation hook (off in this run, or checked by the preflight when on) would read; the picture
    then takes the training shards rather than stopping the run."""
    from mimscale.data.manifest import resolve_source

    try:
        resolve_source(where)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _leading_shards(source: Any, n: int) -> Any:
    """The first shards of ``source`` holding its first ``n`` samples (the first shard when the
    counts are unknown); no digest check, since the picture reads only part of a shard."""
    if source.counts is None:
        return dataclasses.replace(source, urls=source.urls[:1], counts=(n,), nbytes=None, sha256=None)
    k = next(
        (i + 1 for i in range(len(source.counts)) if sum(source.counts[: i + 1]) >= n), len(source.counts)
    )
    nbytes = source.nbytes[:k] if source.nbytes is not None else None
    return dataclasses.replace(
        source, urls=source.urls[:k], counts=source.counts[:k], nbytes=nbytes, sha256=None
    )


def picture_batch(recipe: Any, spec: Any) -> dict[str, Any]:
    """The fixed picture set as one collated batch, the same on every rank and at every step.

    Args:
        recipe: the run's recipe (``train.recon_images``, ``data.val`` / ``data.train``, teacher).
        spec: the training loader's :class:`~mimscale.data.reader.EpochSpec` (views, masks,
            ``data.decode``, the bank), of which the picture keeps everything but the sampling.

    Returns:
        A batch as the training loader makes it (``mask``, ``mask_noise``, ``teacher`` from the
        bank, ``jpegs`` + ``device_decode`` with ``data.decode: gpu``).
    """
    from mimscale.config import ViewConfig
    from mimscale.data.batches import EpochDataset
    from mimscale.data.manifest import resolve_source

    n = recipe.train.recon_images
    _, where = _picture_source(recipe)
    views = tuple(
        ViewConfig(size=v.size, crop="center", hflip=0.0, interpolation=v.interpolation) for v in spec.views
    )  # one fixed crop per image (a bank replays its own stored views instead)
    one = dataclasses.replace(
        spec, source=_leading_shards(resolve_source(where), n), views=views, batch_size=n, rank=0,
        world_size=1, workers=1, mode="eval", batches_per_epoch=1, shuffle_buffer=0, epoch=0, start=0,
        on_error="skip",  # a picture never stops a run: an unreadable image becomes padding
    )  # fmt: skip
    batch = next(iter(EpochDataset(one)))
    if "jpegs" in batch:  # data.decode: gpu: the engine decodes on its device, as for training
        from mimscale.data.gpu_decode import DeviceDecode

        batch["device_decode"] = DeviceDecode(views, _already_counted)
    return batch


def _record(run_dir: Path, batch: dict[str, Any], source: str) -> None:
    """Write the picture set's keys once to ``run_dir/images/recon_set.json`` (rank 0); a resumed
    run whose data now gives other images says so and records the new set."""
    path = run_dir / "images" / "recon_set.json"
    keys = [k for k, ok in zip(batch["keys"], batch["valid"].tolist(), strict=True) if ok]
    record = {"source": source, "keys": keys}
    if path.is_file():
        old = json.loads(path.read_text())
        if old == record:
            return
        print(f"[mimscale] the picture set changed since {path} was written: {old} -> {record}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def write_reconstruction(trainer: Any) -> Path | None:
    """The picture of the fixed set (:func:`picture_batch`, read at the first picture) at the
    trainer's step. Collective: every rank runs the method (ZeRO-3 gathers parameters); rank 0
    writes ``run_dir/images/recon_step<step>.png``, logs it, and returns its path."""
    from mimscale.engine.setup import prepare_batch

    recipe, dist = trainer.recipe, trainer.dist
    if trainer.recon_batch is None:
        trainer.recon_batch = picture_batch(recipe, trainer.loader.spec)
        if dist.rank == 0:
            _record(trainer.run_dir, trainer.recon_batch, _picture_source(recipe)[0])
    batch = prepare_batch(
        first_rows(trainer.recon_batch, recipe.train.recon_images), dist.device, trainer.dtype
    )
    targets = trainer.targets_fn(batch) if trainer.targets_fn is not None else None
    rec = reconstruct_rows(trainer.method, batch, targets)
    if dist.rank != 0:
        return None
    step = trainer.state.step
    scale = max(1, math.ceil(MIN_CELL / rec.images.shape[-1]))
    png = save_png(
        label_rows(reconstruction_grid(rec, trainer.method.encoder.patch_size, scale=scale)),
        trainer.run_dir / "images" / f"recon_step{step:08d}.png",
    )
    caption = f"{recipe.run.name} step {step}: {', '.join(LABELS)}"
    trainer.logger.log_image("recon", png, step, caption)
    return png
