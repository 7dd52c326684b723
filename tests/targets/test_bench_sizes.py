"""The benchmark's bytes per view are the bytes a written bank really uses per view, and its
target-read measurement reads real records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bank_helpers import tiny_recipe

from mimscale.bench.teacher import _bytes_per_view, _read_throughput


@pytest.mark.parametrize(
    ("method", "encoding"), [("cae_v2", "fp16"), ("mr_mae", "fp32"), ("cae_v2", "pca:8")]
)
def test_bytes_per_view_match_a_written_bank(small_digits, bank_factory, method, encoding) -> None:
    bank = Path(bank_factory(method, encoding))
    manifest = json.loads((bank / "manifest.json").read_text())
    r = tiny_recipe(method, small_digits)
    tokens, channels = (32 // 4) ** 2 + 1, 32 if method == "cae_v2" else 64  # proj 32 vs width 64
    per_view = _bytes_per_view(r, encoding, tokens, channels, method == "mr_mae")
    assert per_view == manifest["record_bytes"]
    records = sum(s["count"] for s in manifest["shards"]) * manifest["views_per_image"]
    headers = sum(s["nbytes"] for s in manifest["shards"]) - records * per_view
    assert 0 < headers < 4096 * len(manifest["shards"])  # the rest is the key list per shard
    got = _read_throughput(r, encoding, tokens, channels, method == "mr_mae", n=32)
    assert got["views_per_s"] > 0 and got["mb_per_s"] == pytest.approx(got["views_per_s"] * per_view / 1e6)
