"""Decode and augment one sample into several views, recording each view's crop exactly.

Every view's geometry is a *crop record* of 7 floats, all in ORIGINAL image pixels (of the
upright image: EXIF orientation applied; 16-bit images are scaled to 8 bits)::

    (src_h, src_w, top, left, height, width, flip)

``replay_crop(image_bytes, record, view)`` reproduces the view's pixels before the colour
augmentations, bit for bit (a later issue stores records beside precomputed teacher targets
and replays them, the FKD recipe of docs/methods.md §6.1). The pixels are a pure function of
(encoded bytes, record, view config, draft flag): the JPEG draft decision is derived from the
record, never from state, so the pipeline and a replay always agree.

All randomness comes from a ``np.random.Generator`` the caller seeds per sample; the
parameter sampling follows torchvision's ``RandomResizedCrop.get_params`` semantics.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps

if TYPE_CHECKING:
    from mimscale.config import ViewConfig

__all__ = [
    "CENTER_CROP_FRACTION",
    "SIMPLE_CROP_PADDING",
    "PHOTOMETRIC_FIELDS",
    "REPLAY_FIELDS",
    "apply_photometric",
    "augment_sample",
    "check_pixels",
    "draft_factor",
    "draw_replay",
    "exif_orientation",
    "render_views",
    "replay_crop",
    "oriented_size",
    "sample_crop",
    "sample_photometric",
    "to_chw",
    "to_rgb",
]

CENTER_CROP_FRACTION = 0.875  # eval: resize 256 / center-crop 224 (MAE FINETUNE.md)
# LC-MAE's simple resized crop (SRC): RandomCrop(size, padding=4, reflect) after the short-side resize.
SIMPLE_CROP_PADDING = 4
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _rrc_params(
    h: int, w: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, driven by a numpy Generator.

    Returns:
        ``(top, left, height, width)`` in pixels of the ``h x w`` image.
    """
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    # Fallback: the whole image, cropped centrally to the nearest allowed ratio.
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _simple_crop_geometry(src_h: int, src_w: int, size: int) -> tuple[float, int, int]:
    """Simple resized crop: the short-side resize factor and the resized image size ``(f, rh, rw)``."""
    f = size / min(src_h, src_w)
    return f, max(size, int(round(src_h * f))), max(size, int(round(src_w * f)))


def sample_crop(src_h: int, src_w: int, view: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """Draw one view's geometry.

    Args:
        src_h: original image height in pixels.
        src_w: original image width in pixels.
        view: the view's config (crop kind, size, scale, ratio, hflip).
        rng: the sample's generator.

    Returns:
        float64 ``[7]`` crop record ``(src_h, src_w, top, left, height, width, flip)``.
    """
    if view.crop == "rrc":
        top, left, ch, cw = _rrc_params(src_h, src_w, view.scale, view.ratio, rng)
        box = (float(top), float(left), float(ch), float(cw))
    elif view.crop == "simple":
        f, rh, rw = _simple_crop_geometry(src_h, src_w, view.size)
        p = SIMPLE_CROP_PADDING
        oy = int(rng.integers(0, rh + 2 * p - view.size + 1)) - p
        ox = int(rng.integers(0, rw + 2 * p - view.size + 1)) - p
        box = (oy / f, ox / f, view.size / f, view.size / f)  # may extend into the reflect pad
    elif view.crop == "center":
        side = max(1, int(round(min(src_h, src_w) * CENTER_CROP_FRACTION)))
        box = (float((src_h - side) // 2), float((src_w - side) // 2), float(side), float(side))
    elif view.crop == "resize":
        box = (0.0, 0.0, float(src_h), float(src_w))
    else:
        raise ValueError(f"unknown crop kind {view.crop!r}")
    flip = float(view.hflip > 0 and rng.random() < view.hflip)
    return np.array([src_h, src_w, *box, flip], dtype=np.float64)


def draft_factor(record: Sequence[float], view: ViewConfig) -> int:
    """Largest JPEG DCT reduction (1, 2, 4 or 8) that still leaves the crop >= the view size.

    Draft decoding is only allowed when the crop will be downscaled anyway, so it never
    upsamples a reduced image. Derived from the record alone so replays agree.
    """
    src_h, src_w, _, _, ch, cw, _ = (float(x) for x in record)
    if view.crop == "simple":
        ch = cw = min(src_h, src_w)  # the whole image is resized so its short side = size
    for d in (8, 4, 2):
        if ch / d >= view.size and cw / d >= view.size:
            return d
    return 1


_ORIENTATION = 0x0112  # EXIF tag; values 5-8 are transposed or rotated by 90 degrees


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = stored upright, also for a missing or malformed block)."""
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the stored orientation
        return 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the image as displayed: after its EXIF orientation (header only)."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse an image larger than ``max_pixels`` from its header alone, before any decoding.

    PIL only refuses above twice its ``MAX_IMAGE_PIXELS`` (~179 MPix): a small PNG of
    12,000 x 12,000 pixels would otherwise decode in full (~750 MB per worker).

    Raises:
        ValueError: the image's width x height exceeds ``max_pixels``.
    """
    with warnings.catch_warnings():  # PIL's bomb warning at open: the cap below is the judge
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        w, h = Image.open(io.BytesIO(data)).size
    if w * h > max_pixels:
        raise ValueError(
            f"{w}x{h} = {w * h / 1e6:.1f} MPix is above data.max_pixels = {max_pixels / 1e6:.1f} MPix"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, 16-bit grayscale scaled to 8 bits.

    ``convert("RGB")`` alone would clip a 16-bit PNG (mode ``I;16`` / ``I``) instead of
    scaling it, and would leave a phone photo sideways.
    """
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit samples (I;16, I;16B, or I from older Pillow)
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _decode(data: bytes, factor: int) -> tuple[Image.Image, int]:
    """Decode to upright RGB, with JPEG draft reduction ``factor``; returns (image, actual reduction)."""
    img = Image.open(io.BytesIO(data))
    stored_w = img.size[0]
    if factor > 1 and img.format == "JPEG":
        img.draft(img.mode, (max(1, img.size[0] // factor), max(1, img.size[1] // factor)))
        # The DCT reduction is an integer; the reduced width is ceil(w / d), so round the ratio.
        reduction = max(1, int(round(stored_w / img.size[0])))
    else:
        reduction = 1
    return to_rgb(img), reduction


def _geometric(img: Image.Image, reduction: int, record: Sequence[float], view: ViewConfig) -> Image.Image:
    """Apply a crop record to an image decoded with DCT ``reduction``; returns ``size x size`` RGB."""
    src_h, src_w, top, left, ch, cw, flip = (float(x) for x in record)
    resample = _RESAMPLE[view.interpolation]
    s = view.size
    if view.crop == "simple":
        f, rh, rw = _simple_crop_geometry(int(src_h), int(src_w), s)
        p = SIMPLE_CROP_PADDING
        resized = np.asarray(img.resize((rw, rh), resample))
        padded = np.pad(resized, ((p, p), (p, p), (0, 0)), mode="reflect")
        oy, ox = int(round(top * f)) + p, int(round(left * f)) + p
        out = Image.fromarray(np.ascontiguousarray(padded[oy : oy + s, ox : ox + s]))
    else:
        r = reduction
        box = (left / r, top / r, (left + cw) / r, (top + ch) / r)
        out = img.resize((s, s), resample, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def replay_crop(
    image: bytes | Image.Image, record: Sequence[float], view: ViewConfig, draft: bool = True
) -> np.ndarray:
    """Reproduce a view's pixels (geometric part: crop, resize, flip) from its record.

    Args:
        image: the encoded image bytes as stored in the shard (needed for bit-exact JPEG draft
            decoding), or an already decoded PIL image (exact only when no draft was used).
        record: the 7-float crop record, in original pixels.
        view: the view's config (size, crop kind, interpolation).
        draft: whether the pipeline decoded with draft mode (``data.draft``).

    Returns:
        uint8 ``[3, size, size]``.
    """
    if isinstance(image, Image.Image):
        img, reduction = to_rgb(image), 1
    else:
        img, reduction = _decode(image, draft_factor(record, view) if draft else 1)
    return to_chw(_geometric(img, reduction, record, view))


# Photometric record of one view (13 floats), drawn before any pixel is touched so a view can be
# replayed from its record alone: (jitter_on, brightness, contrast, saturation, hue, order x 4,
# grayscale_on, blur_on, blur_sigma, solarize_on). Unused entries are 0.
PHOTOMETRIC_FIELDS = 13
REPLAY_FIELDS = 7 + PHOTOMETRIC_FIELDS


def sample_photometric(view: ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """Draw one view's photometric parameters (float64 ``[13]``).

    The draws follow torchvision ColorJitter(s, s, s, s/4) (random order), then grayscale,
    gaussian blur (sigma ~ U(0.1, 2), SimCLR/BYOL) and solarise, in that order; the random
    stream is consumed exactly as by applying them one after the other.
    """
    p = np.zeros(PHOTOMETRIC_FIELDS, np.float64)
    s = view.color_jitter
    if s > 0 and rng.random() < view.color_jitter_p:
        lo = max(0.0, 1.0 - s)
        p[0] = 1.0
        p[1:4] = [rng.uniform(lo, 1.0 + s) for _ in range(3)]
        p[4] = rng.uniform(-s / 4, s / 4)
        p[5:9] = rng.permutation(4)
    if view.grayscale_p > 0 and rng.random() < view.grayscale_p:
        p[9] = 1.0
    if view.blur_p > 0 and rng.random() < view.blur_p:
        p[10], p[11] = 1.0, float(rng.uniform(0.1, 2.0))
    if view.solarize_p > 0 and rng.random() < view.solarize_p:
        p[12] = 1.0
    return p


def apply_photometric(img: Image.Image, params: Sequence[float]) -> Image.Image:
    """Apply a photometric record (:func:`sample_photometric`) to an RGB image."""
    p = [float(x) for x in params]
    if p[0]:
        import torchvision.transforms.functional as tf  # heavy; imported only when jitter is on

        ops = (tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation, tf.adjust_hue)
        for i in (int(x) for x in p[5:9]):
            img = ops[i](img, p[1 + i])
    if p[9]:
        img = img.convert("L").convert("RGB")
    if p[10]:
        img = img.filter(ImageFilter.GaussianBlur(radius=p[11]))
    if p[12]:
        img = ImageOps.solarize(img, threshold=128)
    return img


def draw_replay(src_h: int, src_w: int, views: Sequence[ViewConfig], rng: np.random.Generator) -> np.ndarray:
    """Every view's full replay record, float64 ``[V, 20]``: the 7-float crop record then the
    13 photometric floats. Geometry of all views is drawn first, then each view's colours."""
    geo = [sample_crop(src_h, src_w, v, rng) for v in views]
    pho = [sample_photometric(v, rng) for v in views]
    return np.concatenate([np.stack(geo), np.stack(pho)], axis=1)


def to_chw(img: Image.Image) -> np.ndarray:
    """PIL RGB -> uint8 ``[3, H, W]`` (contiguous)."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def render_views(
    data: bytes, views: Sequence[ViewConfig], replay: np.ndarray, draft: bool = True
) -> list[np.ndarray]:
    """The pixels of every view from its replay record (:func:`draw_replay`), bit for bit.

    The image is decoded once per distinct draft reduction (usually once in total).

    Returns:
        a list of uint8 ``[3, size_v, size_v]`` arrays, one per view.
    """
    decoded: dict[int, tuple[Image.Image, int]] = {}
    images = []
    for view, record in zip(views, replay, strict=True):
        factor = draft_factor(record[:7], view) if draft else 1
        if factor not in decoded:
            decoded[factor] = _decode(data, factor)
        img, reduction = decoded[factor]
        out = apply_photometric(_geometric(img, reduction, record[:7], view), record[7:])
        images.append(to_chw(out))
    return images


def augment_sample(
    data: bytes, views: Sequence[ViewConfig], rng: np.random.Generator, draft: bool = True
) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode one encoded image and produce all its views.

    The geometry of every view is drawn first, then each view's colour augmentations
    (:func:`draw_replay`), then the pixels are made from those records (:func:`render_views`).

    Args:
        data: encoded image bytes (any format PIL reads).
        views: one config per view.
        rng: the sample's generator (seeded by the pipeline per sample).
        draft: allow JPEG draft decoding when a view's crop is downscaled anyway.

    Returns:
        ``(images, records)``: a list of uint8 ``[3, size_v, size_v]`` arrays, one per view, and
        the float64 ``[V, 7]`` crop records in original pixels.

    Raises:
        PIL.UnidentifiedImageError, OSError: when the bytes are not a decodable image.
    """
    src_w, src_h = oriented_size(Image.open(io.BytesIO(data)))
    replay = draw_replay(src_h, src_w, views, rng)
    return render_views(data, views, replay, draft), replay[:, :7]
