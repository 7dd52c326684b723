"""JPEG decode and crop on the training device (nvjpeg through torchvision), same crop records.

The CPU path (:func:`mimscale.data.transforms.augment_sample`) decodes and resizes in the data
workers, which costs 8-16 cores per GPU at ViT-L step rates. Here the workers only read each
image's header and draw the crop records (:func:`sample_records`, the very same ``sample_crop``
calls and generator draws, so the records are identical); the main process then decodes a whole
batch at once with ``torchvision.io.decode_jpeg(device="cuda")`` and crops, resizes (bicubic
or bilinear with antialiasing, as PIL) and flips on the device (:func:`decode_views`).

Pixels differ from the PIL path only by the decoder's IDCT/upsampling and the resampling
filter's rounding: :data:`PIXEL_TOLERANCE` (mean absolute difference in uint8 levels) is what
the CPU test holds it to (measured on real photos: 0.10-0.18 mean, at most 8 levels in a
pixel, against 16-95 mean for a wrongly flipped view). Draft (DCT-reduced) decoding is a
CPU-path speed-up with no counterpart here, so records are compared with the CPU path's
``draft=False``. Supported: the geometric views of MAE-style recipes (``rrc``, ``center``,
``resize`` crops, flips); colour augmentations and LC-MAE's ``simple`` crop stay on the CPU.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mimscale.config import ViewConfig

__all__ = ["PIXEL_MAX_TOLERANCE", "PIXEL_TOLERANCE", "check_views", "decode_views", "sample_records"]

PIXEL_TOLERANCE = 0.5  # mean |device - PIL| in uint8 levels over a view (decoder + resampling rounding)
PIXEL_MAX_TOLERANCE = 12  # largest |device - PIL| of one pixel (edges of the crop box, chroma upsampling)


def check_views(views: Sequence[ViewConfig]) -> None:
    """Refuse the views this path cannot reproduce, naming the setting."""
    for i, v in enumerate(views):
        if v.crop == "simple":
            raise ValueError(f"data.views[{i}].crop=simple: not supported by the GPU decode path")
        jitter = v.color_jitter > 0 or v.grayscale_p > 0 or v.blur_p > 0 or v.solarize_p > 0
        if jitter:
            raise ValueError(
                f"data.views[{i}]: colour augmentations are not supported by the GPU decode path"
            )


def sample_records(data: bytes, views: Sequence[ViewConfig], rng: np.random.Generator) -> np.ndarray:
    """The crop records of one image from its header alone (worker side): float64 ``[V, 7]``,
    equal to the records :func:`~mimscale.data.transforms.augment_sample` draws with ``rng``."""
    from PIL import Image

    from mimscale.data.transforms import oriented_size, sample_crop

    src_w, src_h = oriented_size(Image.open(io.BytesIO(data)))
    return np.stack([sample_crop(src_h, src_w, v, rng) for v in views])


def decode_views(
    datas: Sequence[bytes], records: np.ndarray, views: Sequence[ViewConfig], device: torch.device
) -> list[torch.Tensor]:
    """Decode a batch of JPEGs on ``device`` and apply each view's record.

    Args:
        datas: ``B`` encoded JPEGs.
        records: float64 ``[B, V, 7]`` crop records (:func:`sample_records`).
        views: the ``V`` view configs.
        device: where to decode (``cuda`` uses nvjpeg; ``cpu`` libjpeg, for tests).

    Returns:
        one uint8 ``[B, 3, size_v, size_v]`` tensor per view, on ``device``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    check_views(views)
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    out = []
    for v, view in enumerate(views):
        out.append(torch.stack([_crop(img, records[b, v], view) for b, img in enumerate(images)]))
    return out


def _crop(img: torch.Tensor, record: np.ndarray, view: ViewConfig) -> torch.Tensor:
    """One view of one decoded ``[3, H, W]`` image: crop box, antialiased resize, flip."""
    _, _, top, left, ch, cw, flip = (float(x) for x in record)
    t, lft = int(round(top)), int(round(left))
    region = img[:, t : t + int(round(ch)), lft : lft + int(round(cw))].unsqueeze(0).float()
    s = view.size
    out = torch.nn.functional.interpolate(region, size=(s, s), mode=view.interpolation, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    return out.flip(-1) if flip else out
