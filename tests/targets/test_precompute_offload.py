"""Precompute with an offloaded teacher (``teacher.offload: true``, DeepSpeed ZeRO-Inference) writes
the bank the resident teacher writes: same keys and views, the same targets within the decoders'
float tolerance. Its own process: it initialises torch.distributed (a group of that process alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bank_helpers import REPO

from mimscale.targets.bank import BankReader


def _records(bank: str | Path) -> dict[tuple[str, str, int], np.void]:
    reader = BankReader(bank)
    out = {}
    for image in sorted(reader.shard_names):
        shard = reader._shard(image)
        for key in shard.keys:
            for k in range(reader.views_per_image):
                out[(image, key, k)] = reader.record(image, key, k)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["fp16", "pca:8"])
def test_precompute_with_an_offloaded_teacher_writes_the_resident_bank(
    small_digits, bank_factory, tmp_path, encoding
) -> None:
    resident = bank_factory("cae_v2", encoding)  # views=2, batch=32, in this process
    cmd = [
        sys.executable, "-m", "mimscale.cli", "precompute-targets", "recipes/cae_v2/cpu_tiny.yaml",
        f"data.train={small_digits}", "teacher.offload=true", "--out", str(tmp_path / "bank"),
        "--views", "2", "--encoding", encoding, "--batch", "32",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    a, b = _records(resident), _records(tmp_path / "bank")
    assert a.keys() == b.keys() and len(a) == 128 * 2
    for where, ra in a.items():
        rb = b[where]
        assert np.array_equal(ra["replay"], rb["replay"]), where  # the same views, bit for bit
        ca, cb = ra["codes"].astype(np.float32), rb["codes"].astype(np.float32)
        assert np.allclose(cb, ca, rtol=2e-3, atol=2e-3), (where, np.abs(cb - ca).max())
