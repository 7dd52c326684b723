"""Target-bank fixtures: a small slice of the digits shards and banks precomputed from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bank_helpers import tiny_recipe

SHARDS = 4  # x 32 images: 128 images, enough for every rank/worker to have shards


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> str:
    """manifest of the first 4 digits shards of 32 images (real PNGs, 32 px)."""
    from mimscale.demo.data import write_digits_shards

    m = write_digits_shards(tmp_path_factory.mktemp("digits_small"), shard_size=32)
    full = json.loads(Path(m["train"]).read_text())
    full["shards"] = full["shards"][:SHARDS]
    full["total"] = sum(s["count"] for s in full["shards"])
    path = Path(m["train"]).with_name("small.json")
    path.write_text(json.dumps(full))
    return str(path)


@pytest.fixture(scope="session")
def bank_factory(small_digits, tmp_path_factory):
    """``make(method, encoding, views=2) -> bank dir``, each bank written once per session."""
    from mimscale.targets.precompute import precompute

    made: dict[tuple, str] = {}

    def make(method: str = "cae_v2", encoding: str = "fp32", views: int = 2) -> str:
        key = (method, encoding, views)
        if key not in made:
            out = tmp_path_factory.mktemp(f"bank_{method}_{encoding.replace(':', '_')}_{views}")
            precompute(tiny_recipe(method, small_digits), out, views=views, encoding=encoding, batch=32)
            made[key] = str(out)
        return made[key]

    return make
