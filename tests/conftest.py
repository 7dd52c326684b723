"""Shared fixtures: the digits demo shards, written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """Train/val manifests of the embedded digits data (real images, 32 px)."""
    from mimscale.demo.data import write_digits_shards

    return write_digits_shards(tmp_path_factory.mktemp("digits"))
