"""Demo data: digits shards are real, stratified, cached, and rebuilt when settings change."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

from mimscale.data.manifest import read_manifest
from mimscale.demo.data import write_digits_shards


def test_digits_shards(digits: dict) -> None:
    assert digits["num_train"] + digits["num_val"] == 1797 and digits["num_classes"] == 10
    train, val = read_manifest(digits["train"]), read_manifest(digits["val"])
    assert train["total"] == digits["num_train"] and val["total"] == digits["num_val"]
    assert len(train["shards"]) == 6 and len(val["shards"]) == 2
    assert train["classes"] == {str(i): i for i in range(10)}
    assert train["source"]["path"] == "sklearn.datasets.load_digits"


def test_cache_reuse_and_rebuild(tmp_path: Path) -> None:
    first = write_digits_shards(tmp_path, size=16, shard_size=1000)
    again = write_digits_shards(tmp_path, size=16, shard_size=1000)
    assert not first["reused"] and again["reused"]
    bigger = write_digits_shards(tmp_path, size=24, shard_size=1000)
    assert not bigger["reused"] and read_manifest(bigger["train"])["total"] == first["num_train"]


def _pngs(manifest: str) -> Counter:
    """The split's images as a multiset of PNG bytes (the same pixels give the same bytes)."""
    out: Counter = Counter()
    for shard in Path(manifest).parent.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    out[tar.extractfile(m).read()] += 1  # type: ignore[union-attr]
    return out


def test_validation_split_is_carved_from_train_only(tmp_path: Path) -> None:
    """`--validation` (for choosing the demo's settings): val is a stratified part of the train
    split and never holds a held-out image; train + val are exactly the usual train split."""
    usual = write_digits_shards(tmp_path / "usual", size=8, shard_size=2000)
    tune = write_digits_shards(tmp_path / "tune", size=8, shard_size=2000, validation=True)
    assert tune["num_train"] + tune["num_val"] == usual["num_train"] == 1438
    assert tune["num_val"] == 287  # round(0.2 * n_c) of each class's train images: 20% of 1438
    assert _pngs(tune["train"]) + _pngs(tune["val"]) == _pngs(usual["train"])
    assert not set(_pngs(tune["val"])) & set(_pngs(usual["val"])) - set(_pngs(usual["train"]))
    again = write_digits_shards(tmp_path / "tune", size=8, shard_size=2000, validation=True)
    assert again["reused"]
    assert not write_digits_shards(tmp_path / "tune", size=8, shard_size=2000)["reused"]  # not a cache hit
