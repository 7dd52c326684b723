"""The WebDataset pipeline: exact coverage, resampled balance, resume, corrupt shards, masks."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds
from photo_folder import make_photo_folder

from mimscale.config import DataConfig, MaskConfig, ViewConfig
from mimscale.data.manifest import read_manifest
from mimscale.data.pipeline import ShardReadError, build_eval_loader, build_train_loader
from mimscale.data.shards import make_shards
from mimscale.masking import batch_noise

VIEWS = [ViewConfig(size=32, scale=[0.5, 1.0]), ViewConfig(size=32, crop="simple", color_jitter=0.4)]
BLOCK = MaskConfig(kind="block", ratio=0.5, min_num_patches=4, repeats=2)


def _all_keys(manifest: str | Path) -> set[str]:
    """Every sample key in the shards of a manifest, read straight from the tar files."""
    base = Path(manifest).parent if str(manifest).endswith(".json") else Path(manifest)
    keys = set()
    for s in read_manifest(manifest)["shards"]:
        with tarfile.open(base / s["name"]) as tf:
            keys |= {m.name.split(".")[0] for m in tf.getmembers()}
    return keys


def _loader(train: str, rank: int = 0, world: int = 1, workers: int = 2, mask: MaskConfig = BLOCK, **data_kw):
    data = DataConfig(train=train, num_workers=workers, shuffle_buffer=64, views=VIEWS, **data_kw)
    return build_train_loader(
        data, mask, img_size=32, patch_size=4, batch_size=32, seed=5, rank=rank, world_size=world
    )


def _valid_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]


def test_folder_to_shards_to_batches_round_trip(tmp_path: Path) -> None:
    good = make_photo_folder(tmp_path / "src")
    make_shards(tmp_path / "src", tmp_path / "out", shard_size=4, progress=False)
    manifest = str(tmp_path / "out" / "manifest.json")
    classes = read_manifest(manifest)["classes"]
    loader = _loader(manifest, workers=0, epoch_mode="exact", mask=MaskConfig(kind="none"))
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 1  # 15 samples, batch 32: one padded batch
    b = batches[0]
    assert b["valid"].sum() == 15 and sorted(_valid_keys(batches)) == sorted(_all_keys(manifest))
    assert "mask" not in b and b["n_skipped"] == 0
    assert [v.shape for v in b["views"]] == [(32, 3, 32, 32)] * 2 and b["views"][0].dtype == torch.uint8
    assert b["crops"].shape == (32, 2, 7) and b["labels"].dtype == torch.int64
    assert sorted(b["labels"][b["valid"]].tolist()) == sorted(classes[c] for c in good.values())


def test_exact_mode_covers_every_sample_once_across_ranks_and_workers(digits: dict) -> None:
    loaders = [_loader(digits["train"], rank=r, world=2, workers=2, epoch_mode="exact") for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch
    runs = [list(ld) for ld in loaders]
    assert [len(r) for r in runs] == [loaders[0].batches_per_epoch] * 2
    keys = [_valid_keys(r) for r in runs]
    assert len(keys[0]) == len(set(keys[0])) and len(keys[1]) == len(set(keys[1]))  # no repeats
    assert not set(keys[0]) & set(keys[1])  # disjoint across ranks
    assert set(keys[0]) | set(keys[1]) == _all_keys(digits["train"])  # complete: 1,438 samples
    pads = [k for r in runs for b in r for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if not v]
    assert len(pads) == 2 * loaders[0].batches_per_epoch * 32 - 1438 and all(pads)  # padding = real samples
    # the next epoch reshuffles but still covers everything exactly once
    epoch1 = [_valid_keys(list(ld)) for ld in loaders]
    assert sorted(epoch1[0] + epoch1[1]) == sorted(keys[0] + keys[1]) and epoch1[0] != keys[0]


def test_exact_mode_with_fewer_shards_than_readers_is_a_clear_error(digits: dict) -> None:
    with pytest.raises(ValueError, match=r"2 shards for 2 ranks x 2 workers = 4 readers"):
        _loader(digits["val"], rank=0, world=2, workers=2, epoch_mode="exact")


def test_resampled_mode_balances_ranks_and_is_deterministic(digits: dict) -> None:
    loaders = [_loader(digits["train"], rank=r, world=2, samples_per_epoch=640) for r in range(2)]
    assert [ld.batches_per_epoch for ld in loaders] == [10, 10]  # 640 // (2 ranks x 32)
    runs = [list(ld) for ld in loaders]
    assert [len(r) for r in runs] == [10, 10]
    assert _valid_keys(runs[0]) != _valid_keys(runs[1])  # ranks draw different streams
    again = list(_loader(digits["train"], rank=0, world=2, samples_per_epoch=640))
    for a, b in zip(runs[0], again, strict=True):
        assert (
            a["keys"] == b["keys"]
            and torch.equal(a["views"][1], b["views"][1])
            and torch.equal(a["mask"], b["mask"])
        )
    assert _valid_keys(list(loaders[0])) != _valid_keys(runs[0])  # epoch 1 differs from epoch 0


def test_bare_pattern_needs_samples_per_epoch(digits: dict, tmp_path: Path) -> None:
    for p in Path(digits["train"]).parent.glob("*.tar"):
        shutil.copy(p, tmp_path / p.name)
    pattern = str(tmp_path / "digits-train-{000000..000005}.tar")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        _loader(pattern)
    with pytest.raises(ValueError, match="manifest"):
        _loader(pattern, epoch_mode="exact")
    assert len(list(_loader(pattern, workers=0, samples_per_epoch=64))) == 2


@pytest.mark.parametrize("mode", ["resampled", "exact"])
def test_resume_yields_exactly_the_remaining_batches(digits: dict, mode: str) -> None:
    kw = {"epoch_mode": mode, "samples_per_epoch": 448 if mode == "resampled" else None}
    full = _loader(digits["train"], rank=1, world=2, **kw)
    full.set_epoch(1)
    reference = list(full)
    first = _loader(digits["train"], rank=1, world=2, **kw)
    first.set_epoch(1)
    it = iter(first)
    consumed = [next(it) for _ in range(5)]  # odd: the resumed workers must rotate
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 5
    resumed = _loader(digits["train"], rank=1, world=2, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the engine's usual call: the same epoch keeps the position
    rest = list(resumed)
    assert len(consumed) + len(rest) == len(reference) == full.batches_per_epoch
    for a, b in zip(consumed + rest, reference, strict=True):
        assert a["keys"] == b["keys"] and a["batch_index"] == b["batch_index"]
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["crops"], b["crops"])
    assert resumed.state_dict()["batches"] == full.batches_per_epoch


def test_state_from_a_different_layout_is_refused(digits: dict) -> None:
    state = _loader(digits["train"], workers=2, samples_per_epoch=320).state_dict()
    with pytest.raises(ValueError, match="workers"):
        _loader(digits["train"], workers=1, samples_per_epoch=320).load_state_dict(state)


def test_masks_travel_in_the_batch(digits: dict) -> None:
    for mask, count in [(BLOCK, 32), (MaskConfig(kind="random", ratio=0.75), 48)]:
        batch = next(iter(_loader(digits["train"], workers=0, samples_per_epoch=64, mask=mask)))
        repeats = mask.repeats
        assert batch["mask"].shape == (32 * repeats, 64) and batch["mask"].dtype == torch.bool
        assert (batch["mask"].sum(1) == count).all()
        if repeats > 1:  # the copies of one sample are masked differently
            assert not torch.equal(batch["mask"][0], batch["mask"][1])


def test_mask_noise_travels_per_sample_across_ranks_and_resume(digits: dict) -> None:
    """The noise device-side masks draw from (MR-MAE focused, LC-MAE view 2) is data: per sample
    from (seed, epoch, key), whichever rank, worker or batch the sample lands in."""
    mask = MaskConfig(kind="random", ratio=0.75, repeats=2)
    for rank in (0, 1):
        loader = _loader(digits["train"], rank=rank, world=2, workers=2, samples_per_epoch=128, mask=mask)
        loader.set_epoch(3)
        for batch in loader:
            assert batch["mask_noise"].shape == (64, 64) and batch["mask_noise"].dtype == torch.float32
            torch.testing.assert_close(batch["mask_noise"], batch_noise(5, 3, batch["keys"], 64, 2))


def _truncate_copy(digits: dict, tmp_path: Path) -> Path:
    src = Path(digits["train"]).parent
    for p in src.iterdir():
        if p.is_file():
            shutil.copy(p, tmp_path / p.name)
    bad = tmp_path / "digits-train-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])
    return tmp_path / "manifest.json"


def test_truncated_shard_is_skipped_and_counted(digits: dict, tmp_path: Path) -> None:
    manifest = _truncate_copy(digits, tmp_path)
    loader = _loader(
        str(manifest), workers=0, epoch_mode="exact", on_error="skip", mask=MaskConfig(kind="none")
    )
    with pytest.warns(RuntimeWarning, match="digits-train-000002.tar"):
        batches = list(loader)
    assert len(batches) == loader.batches_per_epoch  # no hang, no short epoch
    assert batches[-1]["n_skipped"] >= 1
    valid = _valid_keys(batches)
    assert len(valid) == len(set(valid)) and 1438 - 256 < len(valid) < 1438


def test_truncated_shard_fails_naming_the_shard(digits: dict, tmp_path: Path) -> None:
    manifest = _truncate_copy(digits, tmp_path)
    loader = _loader(
        str(manifest), workers=1, epoch_mode="exact", on_error="fail", mask=MaskConfig(kind="none")
    )
    with pytest.raises(ShardReadError, match="digits-train-000002.tar"):
        list(loader)


def test_undecodable_sample_is_replaced_by_padding(digits: dict, tmp_path: Path) -> None:
    src = Path(digits["val"]).parent
    shutil.copytree(src, tmp_path / "val")
    shard = tmp_path / "val" / "digits-val-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[3]["png"] = b"\x89PNG garbage"
    with wds.TarWriter(str(shard), mtime=0) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    data = DataConfig(val=str(tmp_path / "val"), num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(build_eval_loader(data, img_size=32, batch_size=64, rank=0, world_size=1))
    assert any(samples[3]["__key__"] in str(w.message) for w in caught)
    keys = _valid_keys(batches)
    assert len(keys) == 358 and samples[3]["__key__"] not in keys
    assert sum(b["n_skipped"] for b in batches[:1]) == 1


def test_eval_loader_splits_exactly_across_ranks(digits: dict) -> None:
    data = DataConfig(val=digits["val"], num_workers=2)
    loaders = [build_eval_loader(data, img_size=32, batch_size=64, rank=r, world_size=3) for r in range(3)]
    assert len({ld.batches_per_epoch for ld in loaders}) == 1
    keys = [_valid_keys(list(ld)) for ld in loaders]
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == 359
    assert set().union(*keys) == _all_keys(digits["val"])
    again = list(loaders[0])  # deterministic: no augmentation, same order every time
    assert _valid_keys(again) == keys[0]


def test_epoch_position_semantics(digits: dict) -> None:
    loader = _loader(digits["train"], workers=0, samples_per_epoch=96, mask=MaskConfig(kind="none"))
    assert len(list(loader)) == 3 and loader.state_dict()["batches"] == 3
    loader.set_epoch(0)  # the finished epoch stays finished (e.g. resume at an epoch boundary)
    assert list(loader) == []
    epoch1 = list(loader)  # without set_epoch, the next iter() moves on by itself
    assert loader.epoch == 1 and len(epoch1) == 3
    loader.set_epoch(5)
    assert [b["batch_index"] for b in loader] == [0, 1, 2] and loader.epoch == 5


def _corrupt_samples(digits: dict, tmp_path: Path, where: dict[str, list[int]]) -> Path:
    """A copy of the digits train shards with the images of some samples replaced by garbage."""
    for p in Path(digits["train"]).parent.iterdir():
        if p.is_file():
            shutil.copy(p, tmp_path / p.name)
    m = read_manifest(tmp_path / "manifest.json")
    for name, positions in where.items():
        shard = tmp_path / name
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        for i in positions:
            samples[i]["png"] = b"\x89PNG garbage"
        with wds.TarWriter(str(shard), mtime=0) as w:
            for s in samples:
                w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
        entry = next(s for s in m["shards"] if s["name"] == name)  # keep the manifest true to the files
        entry["bytes"] = shard.stat().st_size
        entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return tmp_path / "manifest.json"


BAD = {"digits-train-000000.tar": [3, 50, 100], "digits-train-000004.tar": [10, 200]}


def test_shard_errors_is_the_exact_total_over_workers_epochs_and_resume(digits: dict, tmp_path: Path) -> None:
    manifest = str(_corrupt_samples(digits, tmp_path, BAD))
    none = MaskConfig(kind="none")
    loaders = [_loader(manifest, rank=r, world=2, workers=2, epoch_mode="exact", mask=none) for r in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        runs = [list(ld) for ld in loaders]
        # every undecodable sample is counted once, whichever rank and worker decoded it
        first_epoch = [ld.shard_errors for ld in loaders]
        assert sum(first_epoch) == 5 and all(len(r) == loaders[0].batches_per_epoch for r in runs)
        for ld in loaders:  # the next epoch adds its own
            list(ld)
        assert sum(ld.shard_errors for ld in loaders) == 10
        # interrupted and resumed mid-epoch: nothing counted twice, nothing lost
        totals = []
        for r in range(2):
            first = _loader(manifest, rank=r, world=2, workers=2, epoch_mode="exact", mask=none)
            it = iter(first)
            for _ in range(5):
                next(it)
            state = first.state_dict()
            first.close()
            resumed = _loader(manifest, rank=r, world=2, workers=2, epoch_mode="exact", mask=none)
            resumed.load_state_dict(state)
            list(resumed)
            totals.append(resumed.shard_errors)
        assert totals == first_epoch


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_every_padding_and_replacement_row_is_flagged_invalid(
    digits: dict, tmp_path: Path, mode: str
) -> None:
    """``valid`` (bool ``[B]``) is False exactly for rows that are not a real, decoded sample."""
    manifest = str(_corrupt_samples(digits, tmp_path, BAD))
    bad_keys = set()
    for name, positions in BAD.items():
        keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / name), shardshuffle=False)]
        bad_keys |= {keys[i] for i in positions}
    kw = {"samples_per_epoch": 1438} if mode == "resampled" else {}
    loader = _loader(manifest, workers=2, epoch_mode=mode, mask=MaskConfig(kind="none"), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batches = list(loader)
    assert all(b["valid"].dtype == torch.bool and b["valid"].shape == (32,) for b in batches)
    rows = [(k, v) for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True)]
    valid = [k for k, v in rows if v]
    invalid = [k for k, v in rows if not v]
    assert not bad_keys & set(valid)  # an undecodable sample is never a valid row
    assert set(invalid) <= set(valid) | {""}  # every invalid row is a copy (or zeros), never a new sample
    if mode == "exact":  # every decodable sample exactly once; everything else is flagged
        assert sorted(valid) == sorted(_all_keys(manifest) - bad_keys)
        assert len(invalid) == len(rows) - (1438 - 5)
    else:  # drawn with replacement: one invalid row per undecodable draw, each counted once
        assert len(invalid) == loader.shard_errors > 0


@pytest.mark.parametrize(
    "where", ["in1k-train", "in1k-train/manifest.json", "in1k-train/x-{000000..000003}.tar"]
)
def test_missing_data_path_is_one_line_naming_the_key_and_path(tmp_path: Path, where: str) -> None:
    path = str(tmp_path / where)
    with pytest.raises(FileNotFoundError) as e:
        _loader(path, workers=0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.train: ") and str(tmp_path / "in1k-train") in msg
    assert "mimscale prep-shards" in msg
    with pytest.raises(FileNotFoundError, match=r"^data\.val: "):
        build_eval_loader(DataConfig(val=path), img_size=32, batch_size=8, rank=0, world_size=1)
