"""JPEG decode and crop on the training device (nvjpeg through torchvision), same crop records.

The CPU path (:func:`mimscale.data.transforms.augment_sample`) decodes and resizes in the data
workers, which costs 8-16 cores per GPU at ViT-L step rates. Here the workers only read each
image's header and draw the crop records (:func:`sample_records`, the very same ``sample_crop``
calls and generator draws, so the records are identical); the main process then decodes a whole
batch at once with ``torchvision.io.decode_jpeg(device="cuda")`` and crops, resizes (bicubic
or bilinear with antialiasing, as PIL) and flips on the device (:func:`decode_views`).

Pixels differ from the PIL path only by the decoder's IDCT/upsampling and the resampling
filter's rounding: :data:`PIXEL_TOLERANCE` (mean absolute difference in uint8 levels) is what
the CPU test holds it to (measured on six real photos, both filters: 0.09-0.18 mean, against
16-95 mean for a wrongly flipped view). Single pixels at saturated colour edges differ by up to
24 levels (the decoders' chroma upsampling, measured with libjpeg on the CPU; the max stays the
same when PIL's two-pass uint8 resampling is emulated), hence :data:`PIXEL_MAX_TOLERANCE`.
Draft (DCT-reduced) decoding is a CPU-path speed-up with no counterpart here, so records are
compared with the CPU path's ``draft=False``. Supported: the geometric views of MAE-style
recipes (``rrc``, ``center``, ``resize`` crops, flips); colour augmentations and LC-MAE's
``simple`` crop stay on the CPU. nvjpeg ignores EXIF, so the orientation read with the header
travels with the batch and is applied on the device (:func:`upright`), on every device alike.

Wiring (``data.decode: gpu``): the loader's workers ship ``jpegs`` (the encoded bytes) and the
records in ``crops`` instead of ``views``; the engine's ``prepare_batch`` calls
:func:`decode_batch` on the training device, so the method sees the same ``views`` / ``images``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mimscale.config import ViewConfig

__all__ = [
    "PIXEL_MAX_TOLERANCE",
    "PIXEL_TOLERANCE",
    "DeviceDecode",
    "check_views",
    "decode_batch",
    "decode_views",
    "header_records",
    "sample_records",
    "upright",
]

PIXEL_TOLERANCE = 0.5  # mean |device - PIL| in uint8 levels over a view (decoder + resampling rounding)
PIXEL_MAX_TOLERANCE = 32  # largest |device - PIL| of one pixel (colour edges: chroma upsampling)


def check_views(views: Sequence[ViewConfig]) -> None:
    """Refuse the views this path cannot reproduce, naming the view key (``data.views[i].…``)."""
    for i, v in enumerate(views):
        if v.crop == "simple":
            raise ValueError(f"data.views[{i}].crop=simple: not supported with data.decode=gpu")
        for key in ("color_jitter", "grayscale_p", "blur_p", "solarize_p"):
            if getattr(v, key) > 0:
                raise ValueError(
                    f"data.views[{i}].{key}={getattr(v, key)}: colour augmentations are not supported "
                    "with data.decode=gpu (use data.decode=cpu)"
                )


def sample_records(data: bytes, views: Sequence[ViewConfig], rng: np.random.Generator) -> np.ndarray:
    """The crop records of one image from its header alone (worker side): float64 ``[V, 7]``,
    equal to the records :func:`~mimscale.data.transforms.augment_sample` draws with ``rng``."""
    return header_records(data, views, rng)[0]


def header_records(
    data: bytes, views: Sequence[ViewConfig], rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """:func:`sample_records` and the image's EXIF orientation (1-8), from one header read.

    nvjpeg ignores EXIF (torchvision applies it on the CPU only), so the orientation travels
    with the batch and :func:`decode_batch` applies it on the device.
    """
    from PIL import Image

    from mimscale.data.transforms import exif_orientation, oriented_size, sample_crop

    img = Image.open(io.BytesIO(data))
    src_w, src_h = oriented_size(img)
    return np.stack([sample_crop(src_h, src_w, v, rng) for v in views]), exif_orientation(img)


def decode_views(
    datas: Sequence[bytes],
    records: np.ndarray,
    views: Sequence[ViewConfig],
    device: torch.device,
    orientations: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Decode a batch of JPEGs on ``device`` and apply each view's record.

    Args:
        datas: ``B`` encoded JPEGs.
        records: ``[B, V, 7]`` crop records (:func:`sample_records`).
        views: the ``V`` view configs.
        device: where to decode (``cuda`` uses nvjpeg; ``cpu`` libjpeg, for tests).
        orientations: each image's EXIF orientation (:func:`header_records`); read from the
            headers when not given.

    Returns:
        one uint8 ``[B, 3, size_v, size_v]`` tensor per view, on ``device``.

    Raises:
        RuntimeError: an image the decoder refuses (:func:`decode_batch` is the tolerant path).
    """
    check_views(views)
    if orientations is None:
        from PIL import Image

        from mimscale.data.transforms import exif_orientation

        orientations = [exif_orientation(Image.open(io.BytesIO(d))) for d in datas]
    images = []
    for img in _decode_jpegs(datas, orientations, device):
        if isinstance(img, BaseException):
            raise img
        images.append(img)
    return [
        _finish([_resize(img, records[b, v], view) for b, img in enumerate(images)], records[:, v, 6] > 0)
        for v, view in enumerate(views)
    ]


@dataclass(frozen=True)
class DeviceDecode:
    """What the main process needs to finish a ``data.decode: gpu`` batch (the loader attaches it).

    Attributes:
        views: the view configs the records were drawn for.
        on_bad: called with ``(sample key, error)`` for a valid sample that no decoder can read;
            the loader counts it in ``shard_errors`` (``on_error: skip``) or raises (``fail``).
    """

    views: tuple[ViewConfig, ...]
    on_bad: Callable[[str, BaseException], None]


def decode_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The device half of ``data.decode: gpu``: ``jpegs`` + ``crops`` -> uint8 ``views`` on ``device``.

    The whole batch goes through one batched ``decode_jpeg`` call. An image the device decoder
    refuses although its header was read (a truncated file, a PNG named .jpg, a CMYK JPEG nvjpeg
    rejects) is decoded on the host with PIL from the same record (:func:`replay_crop`, exact CPU
    pixels), so nothing is lost. Only an image PIL cannot read either is a bad sample: reported
    through ``device_decode.on_bad`` (counted in the loader's ``shard_errors`` like a worker's bad
    sample, or a :class:`~mimscale.data.reader.ShardReadError` with ``on_error: fail``), its row
    zero-filled and marked ``valid = False`` so the engine drops it, as the CPU path drops it.

    Args:
        batch: a worker batch of the ``gpu`` mode: ``jpegs`` (B encoded images; ``b""`` for a
            padding row with no source), ``orientation`` uint8 ``[B]`` (EXIF), ``crops``
            ``[B, V, 7]``, ``valid`` ``[B]``, ``keys``, ``device_decode`` (:class:`DeviceDecode`).
        device: the training device.

    Returns:
        A new batch with ``views`` (one uint8 ``[B, 3, size_v, size_v]`` per view on ``device``)
        in place of ``jpegs`` / ``device_decode``, and ``valid`` updated.
    """
    job: DeviceDecode = batch["device_decode"]
    datas, records = batch["jpegs"], batch["crops"].numpy()
    valid = batch["valid"].tolist()
    present = [i for i, d in enumerate(datas) if len(d)]
    orientations = batch["orientation"].tolist()
    decoded: dict[int, torch.Tensor | BaseException] = dict(
        zip(
            present,
            _decode_jpegs([datas[i] for i in present], [orientations[i] for i in present], device),
            strict=True,
        )
    )
    rows: list[list[torch.Tensor]] = []  # per sample, per view: float [3, s, s], not yet rounded
    flips = records[:, :, 6] > 0  # still to apply; the host path's pixels come flipped already
    for b in range(len(datas)):
        img = decoded.get(b, ValueError("no image (padding)"))
        if isinstance(img, torch.Tensor):
            rows.append([_resize(img, records[b, v], view) for v, view in enumerate(job.views)])
            continue
        flips[b] = False
        try:
            rows.append([px.float() for px in _host_views(datas[b], records[b], job.views, device)])
        except Exception as e:  # noqa: BLE001 - unreadable by any decoder: a bad sample
            if valid[b]:
                job.on_bad(batch["keys"][b], e)
                valid[b] = False
            rows.append([torch.zeros(3, v.size, v.size, device=device) for v in job.views])
    out = {k: v for k, v in batch.items() if k not in ("jpegs", "device_decode")}
    out["views"] = [_finish([r[v] for r in rows], flips[:, v]) for v in range(len(job.views))]
    out["valid"] = torch.tensor(valid, dtype=torch.bool)
    return out


_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def _decode_jpegs(
    datas: Sequence[bytes], orientations: Sequence[int], device: torch.device
) -> list[torch.Tensor | BaseException]:
    """Upright RGB ``[3, H, W]`` uint8 of each JPEG on ``device``, or the decoder's error for it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(batch: Sequence[bytes]) -> list[torch.Tensor]:
        # EXIF is applied by us on every device: torchvision's flag is CPU-only (nvjpeg ignores
        # it), and one code path keeps the CPU tests true for the GPU.
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in batch]
        # torchvision 0.29 deprecates its image decoders for TorchCodec and warns on every call:
        # a line per batch in a run's log. We stay on decode_jpeg for now: TorchCodec's one PyPI
        # wheel (0.17) is a CUDA 13 build for one torch release (it links libtorch_cuda and
        # libcudart 13, and declares no torch requirement), so it cannot load beside a CPU-only
        # torch or another torch version, and pip cannot pick a matching one. Only that warning
        # is silenced, only here; revisit when torchvision removes decode_jpeg.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _TORCHVISION_IO_DEPRECATION, DeprecationWarning)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)

    if not datas:
        return []
    try:
        images: list[torch.Tensor | BaseException] = list(decode(datas))
    except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
        images = []
        for d in datas:
            try:
                images.append(decode([d])[0])
            except RuntimeError as e:
                images.append(e)
    return [
        upright(img, o) if isinstance(img, torch.Tensor) else img
        for img, o in zip(images, orientations, strict=True)
    ]


def upright(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to ``[..., H, W]`` as PIL's ``exif_transpose`` does
    (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 270, 7 transverse, 8 rotate 90)."""
    if orientation in (5, 6, 7, 8):
        img = img.transpose(-2, -1)
    dims = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return img.flip(dims) if dims else img


def _host_views(
    data: bytes, record: np.ndarray, views: Sequence[ViewConfig], device: torch.device
) -> list[torch.Tensor]:
    """The CPU path's pixels of one image (PIL, no draft), for an image the device decoder refused."""
    from mimscale.data.transforms import replay_crop

    views_px = [replay_crop(data, record[v], view, draft=False) for v, view in enumerate(views)]
    warnings.warn(
        "data.decode=gpu: an image the device decoder refused was decoded on the host instead "
        "(not a baseline JPEG?); a shard of such images is faster with data.decode=cpu",
        RuntimeWarning,
        stacklevel=3,
    )
    return [torch.from_numpy(px).to(device) for px in views_px]


def _resize(img: torch.Tensor, record: np.ndarray, view: ViewConfig) -> torch.Tensor:
    """One view of one decoded ``[3, H, W]`` image: crop box, antialiased resize; float
    ``[3, s, s]``, rounded and flipped for the whole batch at once by :func:`_finish`."""
    _, _, top, left, ch, cw, _ = (float(x) for x in record)
    t, lft = int(round(top)), int(round(left))
    region = img[:, t : t + int(round(ch)), lft : lft + int(round(cw))].unsqueeze(0).float()
    s = view.size
    return torch.nn.functional.interpolate(region, size=(s, s), mode=view.interpolation, antialias=True)[0]


def _finish(crops: Sequence[torch.Tensor], flips: np.ndarray) -> torch.Tensor:
    """One view's crops -> uint8 ``[B, 3, s, s]``, mirrored where ``flips``: a few kernels per
    batch instead of per image (the launches, not the arithmetic, bound this on a GPU)."""
    out = torch.stack(list(crops)).round_().clamp_(0, 255).to(torch.uint8)
    idx = np.flatnonzero(flips).tolist()
    if idx:
        sel = torch.tensor(idx, device=out.device)
        out[sel] = out[sel].flip(-1)
    return out
