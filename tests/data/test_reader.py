"""Reading shards against their manifest: over-long shards and checksum mismatches are never silent."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import webdataset as wds

from mimscale.config import DataConfig, MaskConfig, ViewConfig
from mimscale.data.pipeline import ShardReadError, build_train_loader

SHARD = "digits-train-000002.tar"


def _copy(digits: dict, tmp_path: Path) -> Path:
    for p in Path(digits["train"]).parent.iterdir():
        if p.is_file():
            shutil.copy(p, tmp_path / p.name)
    return tmp_path / "manifest.json"


def _undercount(manifest: Path, by: int) -> int:
    """The manifest says ``by`` samples fewer for SHARD than the tar holds; returns its true count."""
    m = json.loads(manifest.read_text())
    entry = next(s for s in m["shards"] if s["name"] == SHARD)
    true = entry["count"]
    entry["count"] -= by
    m["total"] -= by
    manifest.write_text(json.dumps(m))
    return true


def _epoch(manifest: Path, on_error: str, mode: str = "exact", workers: int = 2) -> list[dict]:
    data = DataConfig(
        train=str(manifest),
        num_workers=workers,
        shuffle_buffer=0,
        views=[ViewConfig(size=16, crop="resize", hflip=0.0)],
        epoch_mode=mode,
        samples_per_epoch=512 if mode == "resampled" else None,
        on_error=on_error,
    )
    loader = build_train_loader(
        data, MaskConfig(kind="none"), img_size=16, patch_size=4, batch_size=32, seed=0, rank=0, world_size=1
    )
    return list(loader)


def test_shard_longer_than_its_manifest_count_is_warned_and_counted(digits: dict, tmp_path: Path) -> None:
    manifest = _copy(digits, tmp_path)
    true = _undercount(manifest, 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = _epoch(manifest, "skip", workers=0)  # warnings of loader subprocesses go to stderr
    said = [str(w.message) for w in caught if SHARD in str(w.message)]
    assert said and f"manifest says {true - 40}" in said[0]
    keys = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
    assert len(keys) == len(set(keys)) == 1438 - 40  # the manifest's layout; the extra 40 are counted
    assert batches[-1]["n_skipped"] == 1


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_shard_longer_than_its_manifest_count_fails_naming_it(
    digits: dict, tmp_path: Path, mode: str
) -> None:
    manifest = _copy(digits, tmp_path)
    _undercount(manifest, 40)
    with pytest.raises(ShardReadError, match=rf"{SHARD}.*more samples than the manifest"):
        _epoch(manifest, "fail", mode=mode, workers=0)


def _rewrite_same_count(manifest: Path) -> None:
    """Replace SHARD by a different tar with as many samples (one image swapped for another)."""
    shard = manifest.parent / SHARD
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[0]["png"], samples[1]["png"] = samples[1]["png"], samples[0]["png"]
    with wds.TarWriter(str(shard), mtime=0) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})


def test_shard_that_disagrees_with_the_manifest_checksum_is_detected(digits: dict, tmp_path: Path) -> None:
    manifest = _copy(digits, tmp_path)
    _rewrite_same_count(manifest)
    with pytest.raises(ShardReadError, match=rf"{SHARD}.*sha256"):
        _epoch(manifest, "fail", workers=0)
    with pytest.warns(RuntimeWarning, match=rf"{SHARD}.*sha256"):
        batches = _epoch(manifest, "skip", workers=0)
    assert batches[-1]["n_skipped"] == 1


def test_shard_with_another_size_than_the_manifest_is_refused_at_open(digits: dict, tmp_path: Path) -> None:
    manifest = _copy(digits, tmp_path)
    with open(manifest.parent / SHARD, "ab") as f:
        f.write(b"\0" * 512)  # still a valid tar with the same samples, but not the file the manifest names
    with pytest.raises(ShardReadError, match=rf"{SHARD}.*bytes"):
        _epoch(manifest, "fail", workers=0)
