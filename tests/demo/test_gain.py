"""The default demo shows pre-training working: its recipe, shortened, ends above the same encoder
at random initialisation on both held-out readouts (kNN and linear probe, mean-pooled tokens).

The bars fail when pre-training does nothing: with a zero learning rate (``optim.blr=1e-30``: the
recipe refuses 0; 1e-30 steps are lost in fp32 rounding) the trained encoder reads out as the
random one and both gains are 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# Half the demo (5 epochs: 220 optimizer steps of 32 images, 88 of them warm-up), one evaluation at
# the end.
SHORT = ["train.epochs=5", "eval.every=1000", "data.num_workers=1"]
# Held-out gains over random init measured at this length, seed 0: kNN +20.1 (84.7 vs 64.6), linear
# +3.1 points (94.7 vs 91.6). With optim.blr=1e-30 both are 0 and this test fails (checked). The bars
# leave room for run-to-run noise at the fixed seed (another CPU computes other last bits).
KNN_GAIN, LINEAR_GAIN = 10.0, 1.0


def gains(out: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the default demo shortened; return its results with the gains (points) added."""
    from mimscale.demo.run import run_demo

    assert run_demo(out=out, overrides=[*SHORT, *overrides]) == 0
    res = json.loads(next(out.glob("*/demo_results.json")).read_text())
    return {**res, **{k: res["pretrained"][k] - res["random_init"][k] for k in ("knn_top1", "linear_top1")}}


@pytest.mark.slow
def test_default_demo_trains_to_a_gain_over_random_init(tmp_path: Path) -> None:
    res = gains(tmp_path, ["run.seed=0"])
    assert res["steps"] == 220 and res["method"] == "mae + mto", res
    assert res["knn_top1"] >= KNN_GAIN and res["linear_top1"] >= LINEAR_GAIN, res
