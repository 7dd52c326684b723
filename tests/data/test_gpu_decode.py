"""The device decode path reproduces the PIL path's crop records exactly and its pixels within
:data:`PIXEL_TOLERANCE` (run here with torchvision's CPU ``decode_jpeg``; nvjpeg on a GPU)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.config import ViewConfig
from mimscale.data.gpu_decode import (
    PIXEL_MAX_TOLERANCE,
    PIXEL_TOLERANCE,
    check_views,
    decode_views,
    sample_records,
    upright,
)
from mimscale.data.transforms import augment_sample


def _jpegs() -> list[bytes]:
    from sklearn.datasets import load_sample_images

    out = []
    for i, img in enumerate(load_sample_images().images):  # real photos, 427 x 640
        for frame in (img, img.transpose(1, 0, 2)[:500]):  # landscape and portrait
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="JPEG", quality=90 - 10 * i)
            out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_same_records_and_pixels_within_tolerance(interp: str) -> None:
    views = [ViewConfig(size=224, interpolation=interp), ViewConfig(size=96, crop="center", hflip=0.0)]
    datas = _jpegs()
    cpu_images, cpu_records, records = [], [], []
    for i, data in enumerate(datas):
        imgs, rec = augment_sample(data, views, np.random.default_rng(i), draft=False)
        cpu_images.append(imgs)
        cpu_records.append(rec)
        records.append(sample_records(data, views, np.random.default_rng(i)))
    assert all(np.array_equal(a, b) for a, b in zip(cpu_records, records, strict=True))
    assert any(r[0, 6] == 1.0 for r in records) and any(r[0, 6] == 0.0 for r in records)  # flips both ways
    out = decode_views(datas, np.stack(records), views, torch.device("cpu"))
    for v, view in enumerate(views):
        assert out[v].shape == (len(datas), 3, view.size, view.size) and out[v].dtype == torch.uint8
        for b in range(len(datas)):
            ref = torch.from_numpy(cpu_images[b][v]).float()
            diff = (out[v][b].float() - ref).abs()
            assert diff.mean().item() <= PIXEL_TOLERANCE, (v, b, diff.mean().item())
            assert diff.max().item() <= PIXEL_MAX_TOLERANCE, (v, b)  # a wrong flip: 16-95 mean


def test_unsupported_views_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"data.views\[1\].crop=simple"):
        check_views([ViewConfig(), ViewConfig(crop="simple")])
    with pytest.raises(ValueError, match=r"data.views\[0\].color_jitter=0.4: colour"):
        check_views([ViewConfig(color_jitter=0.4)])


def _with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


def test_exif_orientation_is_applied_as_pil_does_on_every_device_path() -> None:
    """nvjpeg ignores EXIF, so the path applies it itself (:func:`upright`) on every device."""
    import skimage.data as skd
    from torchvision.io import ImageReadMode, decode_jpeg

    photo = np.ascontiguousarray(skd.astronaut()[::4, ::3])  # 128 x 171: not square
    views = [ViewConfig(size=64, scale=[0.3, 1.0]), ViewConfig(size=48, crop="resize", hflip=0.0)]
    for o in range(1, 9):
        data = _with_orientation(photo, o)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        ref = decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        assert torch.equal(upright(decode_jpeg(raw, mode=ImageReadMode.RGB), o), ref), o
        imgs, rec = augment_sample(data, views, np.random.default_rng(o), draft=False)
        out = decode_views([data], rec[None], views, torch.device("cpu"))
        for v in range(len(views)):
            diff = (out[v][0].float() - torch.from_numpy(imgs[v]).float()).abs()
            assert diff.mean().item() <= PIXEL_TOLERANCE and diff.max().item() <= PIXEL_MAX_TOLERANCE, (o, v)


@pytest.mark.parametrize("batches", [1, 3])
def test_torchvision_decode_deprecation_is_not_repeated_in_the_log(batches: int) -> None:
    """torchvision 0.29 warns on every decode_jpeg call; under any filter (here: every warning,
    every time) a run's log must not get one line per batch."""
    views = [ViewConfig(size=32, crop="center", hflip=0.0)]
    datas = _jpegs()[:2]
    records = np.stack([sample_records(d, views, np.random.default_rng(0)) for d in datas])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(batches):
            decode_views(datas, records, views, torch.device("cpu"))
    assert not [w for w in caught if "TorchVision are deprecated" in str(w.message)]
