"""Reconstruction pictures and plots to wandb: the grid by hand, the training loop's pictures
(PNG files and a real offline wandb run), a picture step trains exactly as any other, and the
diagnostics and demo plots reach the run's wandb run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimscale.engine.pictures import GREY, first_rows, label_rows, reconstruction_grid
from mimscale.methods.base import Reconstruction
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def normalised(unit: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (unit - mean) / std


def test_grid_by_hand() -> None:
    """Two 4x4 images of patch 2 (2x2 patches): input 0.2, prediction 0.8, the top-left and
    bottom-right patches masked. Rows: input, masked input (grey), prediction, pasted."""
    x, pred = torch.full((2, 3, 4, 4), 0.2), torch.full((2, 3, 4, 4), 0.8)
    mask = torch.tensor([[True, False, False, True]] * 2)
    grid = reconstruction_grid(Reconstruction(normalised(x), mask, normalised(pred)), patch_size=2, pad=1)
    assert grid.shape == (4 * 5 + 1, 2 * 5 + 1, 3) and grid.dtype == np.uint8
    lv = {"in": round(0.2 * 255), "pred": round(0.8 * 255), "grey": round(GREY * 255)}

    def cell(row: int, col: int) -> np.ndarray:  # one image of the grid, [4, 4] (channel 0)
        top, left = 1 + row * 5, 1 + col * 5
        return grid[top : top + 4, left : left + 4, 0].astype(int)

    masked = np.kron(np.array([[1, 0], [0, 1]]), np.ones((2, 2), int)).astype(bool)
    for col in (0, 1):
        assert np.all(np.abs(cell(0, col) - lv["in"]) <= 1)
        assert np.all(np.abs(cell(1, col)[masked] - lv["grey"]) <= 1)
        assert np.all(np.abs(cell(1, col)[~masked] - lv["in"]) <= 1)
        assert np.all(np.abs(cell(2, col) - lv["pred"]) <= 1)
        assert np.all(np.abs(cell(3, col)[masked] - lv["pred"]) <= 1)
        assert np.all(np.abs(cell(3, col)[~masked] - lv["in"]) <= 1)
    assert np.all(grid[0] == 255)  # padding is white


def test_scaled_grid_is_nearest_and_rows_are_labelled() -> None:
    """scale 3: every source pixel becomes a 3x3 block (nearest), so patch edges stay sharp; the
    label column names the four rows with dark text inside each row's band, white elsewhere."""
    x = torch.rand(2, 3, 4, 4)
    pred = torch.rand(2, 3, 4, 4)
    mask = torch.tensor([[True, False, False, True]] * 2)
    rec = Reconstruction(normalised(x), mask, normalised(pred))
    small, big = reconstruction_grid(rec, 2, pad=1), reconstruction_grid(rec, 2, pad=1, scale=3)
    assert big.shape == (4 * 13 + 1, 2 * 13 + 1, 3)
    for row in range(4):
        for col in range(2):
            s = small[1 + row * 5 : 5 + row * 5, 1 + col * 5 : 5 + col * 5]
            b = big[1 + row * 13 : 13 + row * 13, 1 + col * 13 : 13 + col * 13]
            assert np.array_equal(b, s.repeat(3, 0).repeat(3, 1))
    grid = np.full((4 * 98 + 2, 98 + 2, 3), 200, np.uint8)
    out = label_rows(grid, pad=2)
    width = out.shape[1] - grid.shape[1]
    assert out.shape[0] == grid.shape[0] and width > 0 and np.array_equal(out[:, width:], grid)
    labels = out[:, :width].min(axis=2)
    for row in range(4):  # each band holds its label's dark pixels, centred in the band
        band = labels[2 + row * 98 : 2 + (row + 1) * 98]
        ys = np.nonzero((band < 100).any(axis=1))[0]
        assert len(ys) > 5 and 20 < ys.mean() < 78
    assert (labels[:2] == 255).all()


def test_pictures_are_not_recompiled_under_train_compile() -> None:
    """With compiled blocks, a picture (another batch size, no_grad) runs eagerly: no new graph,
    and the same pixels as the uncompiled model."""
    import copy
    import shutil

    from torch._dynamo.utils import counters

    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.pictures import reconstruct_rows
    from mimscale.engine.setup import prepare_batch, seed_everything
    from mimscale.methods import build_method
    from mimscale.models.vit import compile_blocks

    assert shutil.which("g++") or shutil.which("c++"), "inductor needs a C++ compiler on a CPU"
    torch._dynamo.reset()
    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", ["train.micro_batch=4", "train.global_batch=4"])
    seed_everything(0)
    eager = build_method(r)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    train = prepare_batch(synthetic_batch(r, seed=0), torch.device("cpu"), torch.float32)
    compiled(train, train["mask"], None).loss.backward()  # the training step compiles the blocks
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    small = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", ["train.micro_batch=3", "train.global_batch=3"])
    picture = prepare_batch(synthetic_batch(small, seed=1), torch.device("cpu"), torch.float32)
    for _ in range(2):
        got = reconstruct_rows(compiled, picture, None)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for the pictures
    want = reconstruct_rows(eager, picture, None)
    torch.testing.assert_close(got.pred, want.pred, atol=1e-5, rtol=1e-5)


def test_first_rows_skips_padding_and_keeps_masks_per_sample() -> None:
    b, r = 4, 2  # two masks per sample (mask.repeats)
    batch = {
        "views": [torch.arange(b).view(b, 1, 1, 1).expand(b, 3, 2, 2).to(torch.uint8)],
        "keys": ["a", "b", "c", "d"],
        "labels": torch.arange(b),
        "valid": torch.tensor([False, True, True, True]),
        "mask": torch.arange(b * r).view(b * r, 1).expand(b * r, 4) % 2 == 0,
    }
    out = first_rows(batch, 2)
    assert out["keys"] == ["b", "c"] and out["labels"].tolist() == [1, 2]
    assert out["views"][0][:, 0, 0, 0].tolist() == [1, 2]
    assert out["mask"].shape == (4, 4)  # both masks of each kept sample


def _train(digits: dict, out: Path, name: str, *extra: str) -> Path:
    from mimscale.engine.loop import train

    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", [
        f"data.train={digits['train']}", f"data.val={digits['val']}", f"run.out_dir={out}",
        f"run.name={name}", "train.max_steps=3", "train.global_batch=32", "train.micro_batch=16",
        "data.num_workers=0", "train.log_every=1", "run.deterministic=true", *extra])  # fmt: skip
    return train(r)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _first_keys(manifest: str, n: int) -> list[str]:
    """The first ``n`` sample keys of a shard set, in shard order, read with tarfile."""
    import tarfile

    m = json.loads(Path(manifest).read_text())
    keys: list[str] = []
    for shard in m["shards"]:
        with tarfile.open(Path(manifest).parent / shard["name"]) as tar:
            for name in tar.getnames():
                key = name.split(".")[0]
                if key not in keys:
                    keys.append(key)
    return keys[:n]


def _media(run: Path, pattern: str) -> list[Path]:
    return sorted((run / "wandb").glob(f"offline-run-*/files/media/images/**/{pattern}"))


def test_training_pictures_reach_files_and_wandb_and_change_nothing(digits, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    with_pictures = _train(
        digits, tmp_path, "pics", "train.recon_every=2", "train.recon_images=5", "wandb.enabled=true",
        "wandb.mode=offline", "eval.at_end=true", "eval.knn=false", "eval.linear=false",
        "eval.diagnostics=[spectrum]", "eval.diag_images=16",
    )  # fmt: skip
    pngs = sorted(p.name for p in (with_pictures / "images").glob("*.png"))
    assert pngs == ["recon_step00000002.png", "recon_step00000003.png"]  # every 2 steps and the end
    img = np.asarray(Image.open(with_pictures / "images" / pngs[0]))
    # 4 rows x 5 samples of 32 px drawn 3x (96 px), 2 px padding, and a label column on the left
    assert img.shape[0] == 4 * 98 + 2 and img.shape[1] > 5 * 98 + 2 and img.shape[2] == 3
    # the same images at every picture step (a fixed set: the first 5 of the validation split)
    label = img.shape[1] - (5 * 98 + 2)
    later = np.asarray(Image.open(with_pictures / "images" / pngs[1]))
    assert np.array_equal(img[: 2 * 98, label:], later[: 2 * 98, label:])  # input and masked rows
    assert not np.array_equal(img[2 * 98 :, label:], later[2 * 98 :, label:])  # the model moved on
    recorded = json.loads((with_pictures / "images" / "recon_set.json").read_text())
    assert recorded == {"source": "data.val", "keys": _first_keys(digits["val"], 5)}
    assert len(_media(with_pictures, "recon_*.png")) == 2
    assert len(_media(with_pictures, "spectrum_*.png")) == 1  # the eval hook's diagnostics plot
    # A picture step trains exactly as any other step (no RNG draw, no mode change left behind).
    plain = _train(digits, tmp_path, "plain", "train.recon_every=0")
    assert not (plain / "images").exists()
    assert _losses(with_pictures) == _losses(plain)


def test_diagnose_and_demo_plots_go_to_the_runs_wandb_run(digits, tmp_path, monkeypatch) -> None:
    from mimscale.demo.report import _plot
    from mimscale.engine.logger import publish_pngs
    from mimscale.eval.diagnostics import main as diagnose

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _train(digits, tmp_path, "wb", "train.recon_every=0", "wandb.enabled=true", "wandb.mode=offline")
    out = tmp_path / "diag"
    assert diagnose(["spectrum", str(run), "--out", str(out), "--num-images", "16"]) == 0
    assert len(_media(run, "spectrum_*.png")) == 1
    curves = run / "demo_curves.png"
    _plot([{"step": 1, "eval/knn_top1": 10.0, "eval/linear_top1": 12.0}],
          {"knn_top1": 9.0, "linear_top1": 11.0}, curves, "t")  # fmt: skip
    assert publish_pngs(run, {"demo/curves": curves})
    assert len(_media(run, "curves_*.png")) == 1
    # one wandb run, training's, resumed: every offline directory carries its id (wandb names a
    # directory made in the same second as another with a "-1" suffix)
    wid = (run / "wandb_id").read_text().strip()
    pattern = rf"offline-run-\d{{8}}_\d{{6}}-{wid}(-\d+)?"
    assert all(re.fullmatch(pattern, p.name) for p in (run / "wandb").glob("offline-run-*"))
    # a run that does not log to wandb sends nothing
    quiet = _train(digits, tmp_path, "quiet", "train.recon_every=0")
    assert not publish_pngs(quiet, {"demo/curves": curves}) and not (quiet / "wandb").exists()


@pytest.mark.parametrize("bad", ["train.recon_every=-1", "train.recon_images=0"])
def test_bad_picture_keys_are_named(bad: str) -> None:
    from mimscale.config import RecipeError

    with pytest.raises(RecipeError, match=bad.split("=")[0].replace(".", r"\.")):
        load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", [bad])


def test_a_picture_does_not_count_a_bad_device_decoded_image_twice() -> None:
    """data.decode: gpu: the picture decodes rows the step decoded; an image no decoder reads was
    counted (in shard_errors) by the step, so the picture's decode must not report it again."""
    import io

    from mimscale.data.gpu_decode import DeviceDecode, sample_records
    from mimscale.engine.setup import prepare_batch

    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml")
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(buf, format="JPEG")
    good = buf.getvalue()
    rng = np.random.default_rng(0)
    records = np.stack([sample_records(good, r.data.views, rng) for _ in range(3)])
    reported: list[str] = []
    raw = {
        "keys": ["broken", "a", "b"],
        "jpegs": [good[:200], good, good],  # the header reads, the image does not
        "orientation": torch.ones(3, dtype=torch.uint8),
        "crops": torch.from_numpy(records),
        "valid": torch.ones(3, dtype=torch.bool),
        "labels": torch.full((3,), -1),
        "mask": torch.zeros(3, 64, dtype=torch.bool),
        "device_decode": DeviceDecode(tuple(r.data.views), lambda key, err: reported.append(key)),
    }
    step = prepare_batch(raw, torch.device("cpu"), torch.float32)
    assert reported == ["broken"] and step["keys"] == ["a", "b"]  # the step counts it and drops it
    picture = prepare_batch(first_rows(raw, 2), torch.device("cpu"), torch.float32)
    assert reported == ["broken"] and picture["keys"] == ["a"]  # not counted again


def test_a_missing_data_val_falls_back_to_the_training_shards(digits, tmp_path) -> None:
    """cpu_tiny keeps data.val for its eval hook: a run given only data.train (the hook off) must
    still draw its pictures, from the training shards, instead of stopping on the missing val."""
    from types import SimpleNamespace

    from mimscale.engine.pictures import _picture_source

    data = SimpleNamespace(val=str(tmp_path / "nowhere" / "manifest.json"), train=digits["train"])
    recipe = SimpleNamespace(data=data, teacher=SimpleNamespace(source="online"))
    assert _picture_source(recipe) == ("data.train", digits["train"])
    data.val = digits["val"]
    assert _picture_source(recipe) == ("data.val", digits["val"])
