"""`mimscale bench methods` runs end to end on CPU (tiny recipes, one timed step) and prints its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch import REPO


@pytest.mark.slow
def test_bench_methods_prints_the_comparison(tmp_path) -> None:
    out = tmp_path / "b.json"
    args = ["--base", "cpu_tiny", "--steps", "1", "--warmup", "0", "--out", str(out)]
    code = f"import sys; from mimscale.bench.methods import main; sys.exit(main({args!r}))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["variants"]) == {"mae", "lc_mae", "mae+mto"}
    assert all(v["step_s"] > 0 for v in rep["variants"].values())
    assert rep["lc_mae_vs_mae"] > 0 and rep["mto_host"] == "mae" and rep["mto_overhead"] > -1
    # LC-MAE's work: two online passes and two momentum passes on top of MAE's
    flops = {k: v["train_flops_per_image"] for k, v in rep["variants"].items()}
    assert flops["lc_mae"] > 2 * flops["mae"] and flops["mae+mto"] == flops["mae"]
