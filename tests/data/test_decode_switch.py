"""``data.decode: gpu`` through the real loader and engine (the device is the CPU here).

The workers ship JPEG bytes and the crop records; ``prepare_batch`` decodes on the device. The
batches must match ``data.decode: cpu`` key for key and mask for mask, with pixels within the
decoder tolerance of :mod:`mimscale.data.gpu_decode`; a short training run must follow the
cpu-decode run's losses; bad values name their key; broken images lose no count.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import REPO, python, run_cmd
from PIL import Image

from mimscale.config import DataConfig, MaskConfig, RecipeError, ViewConfig
from mimscale.data.gpu_decode import PIXEL_MAX_TOLERANCE, PIXEL_TOLERANCE
from mimscale.data.pipeline import ShardReadError, build_train_loader
from mimscale.engine.setup import prepare_batch
from mimscale.registry import load_recipe, make_recipe

CPU = torch.device("cpu")
VIEWS = [
    ViewConfig(size=32, scale=[0.3, 1.0]),  # rrc + hflip 0.5
    ViewConfig(size=40, crop="center", hflip=0.0, interpolation="bilinear"),
]


@pytest.fixture(scope="module")
def jpeg_digits(tmp_path_factory) -> dict:
    """The digits demo shards as JPEG (q 95) at 48 px: real WebDataset shards with a manifest."""
    from mimscale.demo.data import write_digits_shards

    return write_digits_shards(tmp_path_factory.mktemp("jpeg-digits"), size=48, fmt="jpeg")


def _loader(train: str, decode: str, **kw):
    data = DataConfig(train=train, decode=decode, draft=False, views=VIEWS, shuffle_buffer=64, **kw)
    mask = MaskConfig(kind="block", ratio=0.5, min_num_patches=4, repeats=2)
    return build_train_loader(
        data, mask, img_size=32, patch_size=4, batch_size=32, seed=7, rank=0, world_size=1
    )


def test_one_epoch_gpu_decode_matches_cpu_decode(jpeg_digits: dict) -> None:
    epochs = {}
    for decode in ("cpu", "gpu"):
        loader = _loader(jpeg_digits["train"], decode, num_workers=2, samples_per_epoch=128)
        raw = list(loader)
        if decode == "gpu":  # the workers decoded nothing
            assert all("views" not in b and len(b["jpegs"]) == 32 for b in raw)
            assert all(isinstance(j, bytes) and j[:2] == b"\xff\xd8" for b in raw for j in b["jpegs"])
        epochs[decode] = ([prepare_batch(b, CPU, torch.float32) for b in raw], loader.state_dict())
    (cpu, cpu_state), (gpu, gpu_state) = epochs["cpu"], epochs["gpu"]
    assert cpu_state == gpu_state  # the data position does not depend on the decode mode
    assert len(cpu) == len(gpu) == 4
    flips = set()
    for c, g in zip(cpu, gpu, strict=True):
        assert c["keys"] == g["keys"] and torch.equal(c["labels"], g["labels"])
        assert torch.equal(c["mask"], g["mask"]) and torch.equal(c["crops"], g["crops"])
        flips |= set(g["crops"][:, 0, 6].tolist())
        for v, view in enumerate(VIEWS):
            assert g["views"][v].shape == (32, 3, view.size, view.size) and g["views"][v].dtype == torch.uint8
            diff = (c["views"][v].float() - g["views"][v].float()).abs()
            assert diff.flatten(1).mean(1).max().item() <= PIXEL_TOLERANCE  # per sample and view
            assert diff.max().item() <= PIXEL_MAX_TOLERANCE
            assert torch.allclose(c["images"][v], g["images"][v], atol=PIXEL_MAX_TOLERANCE / 57.0)
    assert flips == {0.0, 1.0}  # a flip applied on the wrong side would be 10x the tolerance


def test_gpu_decode_resumes_mid_epoch_exactly(jpeg_digits: dict) -> None:
    def fields(b: dict) -> tuple:
        return b["keys"], b["jpegs"], b["orientation"].tolist(), b["crops"].tolist(), b["mask"].tolist()

    full = [fields(b) for b in _loader(jpeg_digits["train"], "gpu", num_workers=2, samples_per_epoch=160)]
    first = _loader(jpeg_digits["train"], "gpu", num_workers=2, samples_per_epoch=160)
    it = iter(first)
    head = [fields(next(it)) for _ in range(2)]
    first.close()
    resumed = _loader(jpeg_digits["train"], "gpu", num_workers=2, samples_per_epoch=160)
    resumed.load_state_dict(first.state_dict())
    assert head + [fields(b) for b in resumed] == full and len(full) == 5


# --- the recipe key ------------------------------------------------------------------------------


def test_bad_decode_value_names_the_key() -> None:
    with pytest.raises(RecipeError, match=r"data\.decode: expected one of 'cpu', 'gpu', got str 'tpu'"):
        load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", ["data.decode=tpu"])


@pytest.mark.parametrize(
    ("view", "key"),
    [
        ({"crop": "simple"}, r"data\.views\[1\]\.crop=simple"),
        ({"color_jitter": 0.4}, r"data\.views\[1\]\.color_jitter"),
    ],
)
def test_views_the_device_path_cannot_do_fail_at_recipe_check(view: dict, key: str) -> None:
    views = [{"size": 224}, {"size": 224, **view}]
    with pytest.raises(RecipeError, match=key + r".*data\.decode=gpu"):
        make_recipe("mae", data={"decode": "gpu", "views": views})
    make_recipe("mae", data={"decode": "cpu", "views": views})  # fine on the CPU path


def test_gpu_decode_with_a_precomputed_teacher_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"data\.decode: gpu cannot replay a precomputed teacher"):
        make_recipe("cae_v2", data={"decode": "gpu"}, teacher={"source": "precomputed", "bank": "nowhere"})


def test_train_refuses_before_any_rank_starts(capsys) -> None:
    from mimscale.cli import main

    args = ["data.decode=gpu", "data.views=[{size: 32, crop: simple}]", "train.max_steps=1"]
    assert main(["train", str(REPO / "recipes/mae/cpu_tiny.yaml"), "--nproc", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.views[0].crop=simple: not supported with data.decode=gpu" in err


# --- broken images -------------------------------------------------------------------------------


def _photo(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    import skimage.data as skd

    img = Image.fromarray(skd.astronaut()).resize(size, Image.Resampling.BILINEAR)
    arr = np.roll(np.asarray(img), 7 * seed, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _shard(path: Path) -> tuple[str, dict[str, str]]:
    """One tar of 8 samples: 6 good JPEGs (one EXIF-rotated), a truncated JPEG (its header reads)
    and a PNG named .jpg."""
    samples = {f"s{i}": _photo((64 + 4 * i, 56), "JPEG", i) for i in range(5)}
    full = _photo((80, 60), "JPEG", 9)
    samples["truncated"] = full[: len(full) // 2]
    samples["png_as_jpg"] = _photo((70, 50), "PNG", 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo stored sideways: nvjpeg ignores EXIF, the batch carries it
    buf = io.BytesIO()
    Image.open(io.BytesIO(_photo((72, 52), "JPEG", 4))).save(buf, format="JPEG", quality=90, exif=exif)
    samples["rotated"] = buf.getvalue()
    with tarfile.open(path, "w") as tf:
        for key, data in samples.items():
            for ext, payload in (("jpg", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return str(path), {"bad": "truncated", "png": "png_as_jpg", "rotated": "rotated"}


def _one_batch(train: str, decode: str, on_error: str = "skip"):
    data = DataConfig(
        train=train, decode=decode, draft=False, views=VIEWS, num_workers=0, shuffle_buffer=0,
        samples_per_epoch=8, on_error=on_error,
    )  # fmt: skip
    loader = build_train_loader(
        data, MaskConfig(kind="none"), img_size=32, patch_size=4, batch_size=8, seed=0, rank=0, world_size=1
    )
    return loader, next(iter(loader))


def test_a_jpeg_the_device_cannot_decode_is_a_counted_bad_sample(tmp_path: Path) -> None:
    train, names = _shard(tmp_path / "mixed.tar")
    cpu_loader, cpu_raw = _one_batch(train, "cpu")
    cpu = prepare_batch(cpu_raw, CPU, torch.float32)
    gpu_loader, gpu_raw = _one_batch(train, "gpu")
    assert gpu_raw["valid"].all()  # every header reads: the workers cannot tell
    assert gpu_loader.shard_errors == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpu = prepare_batch(gpu_raw, CPU, torch.float32)
    # The truncated JPEG is dropped and counted once, as the CPU path's workers count it.
    assert cpu_loader.shard_errors == gpu_loader.shard_errors == 1
    assert gpu_loader.state_dict()["shard_errors"] == 1  # saved with the position: exact on resume
    assert names["bad"] not in gpu["keys"] and gpu["keys"] == cpu["keys"] and len(gpu["keys"]) == 7
    assert any(names["bad"] in str(w.message) for w in caught)
    # The PNG the device decoder refuses is decoded on the host from the same record: CPU pixels.
    i = gpu["keys"].index(names["png"])
    for v in range(len(VIEWS)):
        assert torch.equal(gpu["views"][v][i], cpu["views"][v][i])
    i = gpu["keys"].index(names["rotated"])
    assert gpu_raw["orientation"].tolist().count(6) == 1
    for v in range(len(VIEWS)):
        diff = (gpu["views"][v][i].float() - cpu["views"][v][i].float()).abs()
        assert diff.mean().item() <= PIXEL_TOLERANCE and diff.max().item() <= PIXEL_MAX_TOLERANCE
    resumed = _one_batch(train, "gpu")[0]
    resumed.load_state_dict(gpu_loader.state_dict())
    assert resumed.shard_errors == 1


def test_a_jpeg_the_device_cannot_decode_stops_the_run_with_on_error_fail(tmp_path: Path) -> None:
    train, names = _shard(tmp_path / "mixed.tar")
    _, raw = _one_batch(train, "gpu", on_error="fail")
    with pytest.raises(ShardReadError, match=names["bad"]):
        prepare_batch(raw, CPU, torch.float32)


# --- a short training run ------------------------------------------------------------------------


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_with_gpu_decode_on_cpu_follows_cpu_decode(jpeg_digits: dict, tmp_path: Path) -> None:
    runs = {}
    for decode in ("cpu", "gpu"):
        args = {
            "data.train": jpeg_digits["train"], "data.val": jpeg_digits["val"], "data.decode": decode,
            "data.draft": "false", "data.num_workers": 1, "run.out_dir": str(tmp_path), "run.name": decode,
            "train.global_batch": 32, "train.micro_batch": 32, "train.max_steps": 3, "train.log_every": 1,
            "train.zero_stage": 0, "run.deterministic": "true",
        }  # fmt: skip
        cmd = [python(), "-m", "mimscale.train", str(REPO / "recipes/mae/cpu_tiny.yaml")]
        # every warning shown, each time: torchvision's decode_jpeg deprecation must not be one
        out = run_cmd([*cmd, *(f"{k}={v}" for k, v in args.items())], env={"PYTHONWARNINGS": "always"})
        assert "TorchCodec" not in out.stdout + out.stderr
        runs[decode] = _losses(tmp_path / decode)
    cpu, gpu = runs["cpu"], runs["gpu"]
    assert len(cpu) == len(gpu) == 3
    # Same samples, masks and initial weights; the inputs differ only by the decoders' rounding
    # (<= 0.5 of 255 levels on average), which moved the loss by <= 7e-5 relative over these
    # steps (measured). 1e-3 leaves 10x margin and is below the loss's own change from one step
    # to the next (0.2-0.8% here), so other samples or masks would not pass.
    assert np.allclose(gpu, cpu, rtol=1e-3, atol=0), (cpu, gpu)
    assert gpu != cpu  # bitwise equal would mean the switch changed nothing


def test_pictures_with_device_decode(jpeg_digits) -> None:
    """The fixed picture set with ``data.decode: gpu``: JPEG bytes decoded by prepare_batch, the
    same keys, masks and (within the decoder tolerance) pixels as with ``data.decode: cpu``."""
    from mimscale.engine.pictures import picture_batch

    batches = {}
    for decode in ("cpu", "gpu"):
        r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", [
            f"data.train={jpeg_digits['train']}", f"data.val={jpeg_digits['val']}", f"data.decode={decode}",
            "data.draft=false", "train.recon_images=4"])  # fmt: skip
        loader = build_train_loader(
            r.data, r.mask, img_size=32, patch_size=4, batch_size=8, seed=0, rank=0, world_size=1
        )
        raw = picture_batch(r, loader.spec)
        assert ("jpegs" in raw) == (decode == "gpu")
        batches[decode] = prepare_batch(raw, CPU, torch.float32)
    cpu, gpu = batches["cpu"], batches["gpu"]
    assert cpu["keys"] == gpu["keys"] and len(cpu["keys"]) == 4
    assert torch.equal(cpu["mask"], gpu["mask"]) and torch.equal(cpu["mask_noise"], gpu["mask_noise"])
    diff = (cpu["views"][0].int() - gpu["views"][0].int()).abs()
    assert diff.max().item() <= PIXEL_MAX_TOLERANCE and diff.float().mean().item() <= PIXEL_TOLERANCE
