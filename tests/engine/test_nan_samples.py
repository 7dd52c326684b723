"""After a NaN reload the samples counter equals the samples the stream has delivered: the
weights go back to the checkpoint, the data stream does not (so neither does the count)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch import REPO, nan_forward_script, python

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")

# Forward calls 5 and 6 return NaN: two bad steps in a row -> reload the step-4 checkpoint.
NAN_SCRIPT = nan_forward_script("n in (5, 6)")


@pytest.mark.slow
def test_samples_counter_exact_after_nan_reload(digits, tmp_path: Path) -> None:
    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT)
    kw = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(tmp_path),
        "run.name": "n",
        "train.max_steps": 6,
        "train.ckpt_every": 2,
        "train.global_batch": 32,
        "train.micro_batch": 32,
        "train.nan_patience": 2,
        "train.log_every": 1,
        "train.log_keys": True,
        "data.num_workers": 1,
    }
    res = subprocess.run(
        [python(), str(script), RECIPE, *(f"{k}={v}" for k, v in kw.items())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reloading last good checkpoint" in res.stdout
    recs = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    delivered = len((tmp_path / "n" / "keys_rank0.txt").read_text().split())  # every key the stream gave
    assert delivered == 8 * 32  # 4 good steps, 2 NaN steps (reloaded), 2 good steps
    assert recs[-1]["step"] == 6 and recs[-1]["samples"] == delivered
