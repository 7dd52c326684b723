"""Demo data: digits shards are real, stratified, cached, and rebuilt when settings change."""

from __future__ import annotations

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
