"""The logged ``shard_errors`` is the exact total over workers and ranks (real 2-rank DeepSpeed run)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import REPO, free_port, run_cmd  # noqa: E402
from test_pipeline import BAD, _corrupt_samples  # noqa: E402


@pytest.mark.slow
def test_logged_shard_errors_sum_every_worker_and_rank(digits: dict, tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    manifest = _corrupt_samples(digits, tmp_path / "shards", BAD)
    # exact mode, 2 ranks x 2 workers, micro 32: ceil(ceil(1438 / 4) / 32) = 12 batches per worker,
    # 24 per rank = 24 steps; the 5 undecodable samples fall to several workers and ranks.
    args = {
        "data.train": str(manifest),
        "data.val": digits["val"],
        "data.epoch_mode": "exact",
        "data.num_workers": 2,
        "run.out_dir": str(tmp_path),
        "run.name": "e",
        "train.global_batch": 64,
        "train.micro_batch": 32,
        "train.max_steps": 24,
        "train.log_every": 12,
        "train.ckpt_every": 1000,
    }
    exe = shutil.which("deepspeed") or "deepspeed"
    cmd = [exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train"]
    run_cmd([*cmd, str(REPO / "recipes/mae/cpu_tiny.yaml"), *(f"{k}={v}" for k, v in args.items())])
    recs = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [12, 24]
    assert recs[-1]["shard_errors"] == 5  # each bad sample once, whichever worker and rank met it
    assert 0 <= recs[0]["shard_errors"] <= 5
