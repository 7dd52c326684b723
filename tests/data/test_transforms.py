"""Views and crop records: torchvision RRC semantics, draft decoding, exact replay."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mimscale.config import ViewConfig
from mimscale.data.transforms import augment_sample, draft_factor, replay_crop, sample_crop


@pytest.mark.parametrize("crop", ["rrc", "simple", "center", "resize"])
@pytest.mark.parametrize("draft", [True, False])
def test_recorded_crop_replays_to_identical_pixels(photo_jpeg: bytes, crop: str, draft: bool) -> None:
    view = ViewConfig(size=64, crop=crop, scale=[0.3, 1.0])
    for seed in range(4):
        images, records = augment_sample(photo_jpeg, [view], np.random.default_rng(seed), draft=draft)
        assert images[0].shape == (3, 64, 64) and images[0].dtype == np.uint8
        # the batch stores records as float32: replay from that precision too
        replayed = replay_crop(photo_jpeg, records[0].astype(np.float32), view, draft=draft)
        np.testing.assert_array_equal(replayed, images[0])


def test_replay_of_a_multi_view_sample_with_colour_augmentations(photo_jpeg: bytes) -> None:
    """Colour augmentations do not move the geometry; replay gives the geometric part."""
    plain = [ViewConfig(size=64, crop="rrc"), ViewConfig(size=48, crop="simple")]
    coloured = [
        ViewConfig(size=64, crop="rrc", color_jitter=0.4, color_jitter_p=1.0, blur_p=1.0),
        ViewConfig(size=48, crop="simple", grayscale_p=1.0, solarize_p=1.0),
    ]
    img_plain, rec_plain = augment_sample(photo_jpeg, plain, np.random.default_rng(7))
    img_col, rec_col = augment_sample(photo_jpeg, coloured, np.random.default_rng(7))
    np.testing.assert_array_equal(rec_plain, rec_col)
    for view, rec, img in zip(coloured, rec_col, img_plain, strict=True):
        np.testing.assert_array_equal(replay_crop(photo_jpeg, rec, view), img)
    assert (img_col[0] != img_plain[0]).any()
    gray = img_col[1]  # grayscale then solarize keeps the three channels equal
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()


def test_records_are_in_original_pixels(photo_jpeg: bytes) -> None:
    view = ViewConfig(size=64, crop="rrc", scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(300):
        src_h, src_w, top, left, h, w, flip = sample_crop(512, 512, view, rng)
        assert (src_h, src_w) == (512, 512) and flip in (0.0, 1.0)
        assert 0 <= top and top + h <= 512 and 0 <= left and left + w <= 512
        areas.append(h * w / 512**2)
        aspects.append(w / h)
    assert 0.19 <= min(areas) and max(areas) <= 1.0 and np.mean(areas) == pytest.approx(0.6, abs=0.05)
    assert 0.7 <= min(aspects) and max(aspects) <= 1.4
    src = sample_crop(300, 600, ViewConfig(size=64, crop="simple"), rng)
    assert src[4] == pytest.approx(300) and src[5] == pytest.approx(300)  # short side -> 64, crop 64


def test_draft_mode_is_used_only_when_downscaling(photo_jpeg: bytes) -> None:
    small = ViewConfig(size=64, crop="center")
    large = ViewConfig(size=448, crop="center")
    record = sample_crop(512, 512, small, np.random.default_rng(0))  # 448 x 448 box
    assert draft_factor(record, small) == 4  # 448 / 4 = 112 >= 64
    assert draft_factor(record, large) == 1
    rng = np.random.default_rng
    with_draft = augment_sample(photo_jpeg, [small], rng(0), draft=True)[0][0].astype(int)
    without = augment_sample(photo_jpeg, [small], rng(0), draft=False)[0][0].astype(int)
    assert (with_draft != without).any()  # a different decode path ...
    assert np.abs(with_draft - without).mean() < 6  # ... of the same picture


def test_hflip_mirrors_the_same_crop(photo_jpeg: bytes) -> None:
    flip = ViewConfig(size=32, crop="center", hflip=1.0)
    keep = ViewConfig(size=32, crop="center", hflip=0.0)
    a, ra = augment_sample(photo_jpeg, [flip], np.random.default_rng(0))
    b, rb = augment_sample(photo_jpeg, [keep], np.random.default_rng(0))
    assert ra[0, 6] == 1.0 and rb[0, 6] == 0.0
    np.testing.assert_array_equal(a[0], b[0][:, :, ::-1])


def test_png_and_grayscale_inputs(photo_jpeg: bytes) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg)).convert("L").save(buf, format="PNG")
    images, records = augment_sample(buf.getvalue(), [ViewConfig(size=32)], np.random.default_rng(0))
    assert images[0].shape == (3, 32, 32)
    np.testing.assert_array_equal(replay_crop(buf.getvalue(), records[0], ViewConfig(size=32)), images[0])


def test_undecodable_bytes_raise(photo_jpeg: bytes) -> None:
    with pytest.raises(OSError):
        augment_sample(b"not an image", [ViewConfig(size=32)], np.random.default_rng(0))
    with pytest.raises(OSError):
        augment_sample(photo_jpeg[: len(photo_jpeg) // 3], [ViewConfig(size=32)], np.random.default_rng(0))


def test_crop_kind_src_is_now_simple_and_the_old_name_is_refused(tmp_path) -> None:
    """``crop: simple`` (LC-MAE's simple resized crop) is the only name; ``src`` read like "source"."""
    from pathlib import Path

    from mimscale.config import RecipeError
    from mimscale.registry import load_recipe

    tiny = Path(__file__).resolve().parents[2] / "recipes/lc_mae/cpu_tiny.yaml"
    assert [v.crop for v in load_recipe(tiny).data.views] == ["simple", "simple"]
    p = tmp_path / "r.yaml"
    p.write_text(f"_base_: {tiny}\ndata: {{views: [{{size: 32, crop: src}}, {{size: 32, crop: src}}]}}\n")
    with pytest.raises(RecipeError, match="crop"):
        load_recipe(p)


def _png16_gradient() -> bytes:
    """A 16-bit grayscale PNG: a horizontal ramp over the full 0..65535 range."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    return buf.getvalue()


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped() -> None:
    view = ViewConfig(size=32, crop="resize", hflip=0.0)
    images, _ = augment_sample(_png16_gradient(), [view], np.random.default_rng(0))
    row = images[0][0, 16].astype(int)
    assert row[0] <= 4 and row[-1] >= 251  # black to white, as the 16-bit ramp
    assert (images[0] == 255).mean() < 0.1  # (was: everything above 255/65535 clipped to white)
    assert np.all(np.diff(row) >= 0) and np.all(images[0][0] == images[0][1])


def _exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """An upright 24x48 (w x h) image, top red / bottom blue, stored sideways with EXIF orientation 6."""
    upright = np.zeros((48, 24, 3), np.uint8)
    upright[:24, :, 0] = 255
    upright[24:, :, 2] = 255
    up = Image.fromarray(upright)
    stored = up.transpose(Image.Transpose.ROTATE_90)  # orientation 6 displays it rotated back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue(), up


def test_exif_orientation_is_applied_and_the_record_is_in_upright_pixels() -> None:
    data, _ = _exif_rotated_jpeg()
    view = ViewConfig(size=16, crop="resize", hflip=0.0)
    images, records = augment_sample(data, [view], np.random.default_rng(0))
    assert tuple(records[0][:2]) == (48, 24)  # (src_h, src_w) of the upright image
    img = images[0].astype(int)
    assert img[0, :6].mean() > 200 and img[2, :6].mean() < 50  # top rows red
    assert img[2, -6:].mean() > 200 and img[0, -6:].mean() < 50  # bottom rows blue
    np.testing.assert_array_equal(replay_crop(data, records[0], view), images[0])
