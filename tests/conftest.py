"""Shared fixtures: the digits demo shards, written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """Train/val manifests of the embedded digits data (real images, 32 px)."""
    from mimscale.demo.data import write_digits_shards

    return write_digits_shards(tmp_path_factory.mktemp("digits"))


# DeepSpeed's CPU shared-memory all-reduce leaves one /dev/shm buffer per rank of every
# multi-process run that is killed (the kill, preemption and NaN tests kill ranks on purpose);
# over a whole suite they filled 13 GB of this 24 GB machine's memory and the OOM killer took
# a rank of a later test. Tests run one after another, so once a test is over no process of
# it still needs its buffers: drop them.
SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True)
def _drop_leaked_deepspeed_shm_buffers():
    yield
    from pathlib import Path

    for leaked in Path("/dev/shm").glob(SHM_BUFFERS):
        leaked.unlink(missing_ok=True)
