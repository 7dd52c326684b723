"""``mimscale bench suite --smoke`` runs every case end to end on a CPU and writes one valid JSON;
the official MAE peer's shims make its code importable against today's numpy and timm."""

from __future__ import annotations

import json
import sys

import pytest
from launch import run_cmd


@pytest.mark.slow
def test_suite_smoke_writes_one_json(tmp_path) -> None:
    out = tmp_path / "suite.json"
    run_cmd(
        [sys.executable, "-m", "mimscale.cli", "bench", "suite", "--smoke", "--out", str(out)], timeout=900
    )
    r = json.loads(out.read_text())
    cases = r["cases"]
    for z in (0, 1, 2):
        c = cases[f"mae_tiny_zero{z}"]
        assert c["zero_stage"] == z and c["engine_step_s"] > 0 and c["engine_overhead_ratio"] > 0, c
    assert cases["mae_tiny_ckpt"]["activation_checkpointing"] is True
    assert cases["simmim_tiny"]["method"] == "simmim"
    assert all(v > 0 for v in cases["data_cpu_decode"]["images_per_s_per_worker"]["full"].values())
    assert cases["data_device_decode"]["images_per_s"] > 0
    for mode in ("gpu", "cpu"):  # the real loader's data wait with data.decode=gpu / cpu
        assert 0 <= cases["data_device_decode"]["loader"][mode]["data_wait"] < 1
        assert 0 < r["ratios"][f"data_wait_{mode}_decode"] <= 1
    for name in ("peer_official_eager", "peer_official_compiled", "peer_hf_vitmae"):
        assert "images_per_s" in cases[name] or "skipped" in cases[name], cases[name]
    assert not [k for k, v in cases.items() if "error" in v]


def test_official_mae_shims() -> None:
    import numpy as np
    import timm.models.vision_transformer as vt

    from mimscale.bench.peers import shim_official

    shim_official()
    shim_official()  # idempotent: the block is wrapped once
    assert np.float is float
    blk = vt.Block(32, 4, 4.0, qkv_bias=True, qk_scale=None)  # models_mae's call
    assert sum(p.numel() for p in blk.parameters()) > 0
