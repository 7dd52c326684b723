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
    prof = tmp_path / "profile"
    cmd = [sys.executable, "-m", "mimscale.cli", "bench", "suite", "--smoke", "--out", str(out)]
    # generous limits: a shared CI machine runs these cases many times slower than an idle one
    run_cmd([*cmd, "--profile", str(prof), "--budget-s", "1500", "--case-timeout-s", "600"], timeout=1800)
    r = json.loads(out.read_text())
    cases = r["cases"]
    for z in (0, 1, 2):
        c = cases[f"mae_tiny_zero{z}"]
        assert c["zero_stage"] == z and c["engine_step_s"] > 0 and c["engine_overhead_ratio"] > 0, c
        # the bare step at the engine's own precision (fp32 on a CPU) and at both GPU precisions
        assert sorted(c["bare_step_s_by_precision"]) == ["autocast", "bf16", "fp32"], c
        assert c["bare_step_s_by_precision"]["fp32"] == c["bare_step_s"] and c["batch_pinned"] is False
        assert r["ratios"][f"mae_tiny_zero{z}_over_bare_autocast"] > 0
    ac = cases["mae_tiny_zero1_autocast"]
    assert ac["precision"] == "autocast" and ac["bare_step_s_by_precision"]["autocast"] == ac["bare_step_s"]
    assert set(ac["phases_s"]) == {"prepare", "forward", "backward", "step", "ops"}
    stage = ac["zero_stage"]  # the tiny recipe's own stage
    assert (prof / "mae_tiny_zero1_autocast" / f"profile_zero{stage}.txt").read_text().count("aten::") > 5
    # the loader's wait is measured at the step rate the engine reached, full-size and short side 256
    rate = cases["mae_tiny_zero1"]["images_per_s"]
    for shards in ("loader", "loader_short256"):
        for mode in ("gpu", "cpu"):
            assert cases["data_device_decode"][shards][mode]["step_img_s"] == pytest.approx(rate)
            assert 0 < r["ratios"][f"data_wait_{mode}_decode{shards[6:]}"] <= 1
    assert cases["data_device_decode"]["loader_short256"]["cpu"]["short_side"] == 256
    assert "h14_choice" in r["ratios"]  # None in a smoke run: no ViT-H/14 case
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


def test_h14_choice_is_the_fastest_case_that_fits_80_gb() -> None:
    from mimscale.bench.suite import choose_h14

    results = {
        "mae_h14_mb64_ckpt": {"images_per_s": 276.0, "peak_mem_gib": 40.0, "mfu": 0.11},
        "mae_h14_mb64_nockpt": {"images_per_s": 500.0, "peak_mem_gib": 70.0, "mfu": 0.2},
        "mae_h14_mb128_ckpt": {"images_per_s": 600.0, "peak_mem_gib": 75.0},  # over 72 GiB
        "mae_h14_mb32_nockpt": {"error": "CUDA out of memory"},
        "mae_l16_zero1": {"images_per_s": 9999.0, "peak_mem_gib": 1.0},
    }
    c = choose_h14(results)
    assert c is not None and c["case"] == "mae_h14_mb64_nockpt" and c["peak_mem_gib"] == 70.0
    assert choose_h14({"mae_h14_mb64_ckpt": {"images_per_s": 1.0, "peak_mem_gib": 79.0}})["case"] is None
    assert choose_h14({}) is None


def test_summary_and_the_data_wait_at_the_engines_measured_rate(monkeypatch, tmp_path) -> None:
    """The decode case gets the ZeRO-1 case's measured img/s; the summary carries the engine over
    the bare step at each precision and the data wait per shard size and decode."""
    from mimscale.bench import suite

    seen: dict[str, list[str]] = {}

    def fake_case(argv: list[str], timeout: float) -> dict:
        name = "decode" if "mimscale.bench.decode" in argv else argv[argv.index("engine") + 1]
        seen[name] = argv
        if name == "decode":
            wait = {"overhead": 0.5}
            return {"loader": {"gpu": wait, "cpu": wait}, "loader_short256": {"gpu": wait, "cpu": wait}}
        return {"images_per_s": 123.5, "engine_step_s": 2.0, "bare_step_s_by_precision": {"bf16": 1.0}}

    monkeypatch.setattr(suite, "run_case", fake_case)
    monkeypatch.setattr(suite, "_skip_reason", lambda name, a: None if name.startswith("mae") or
                        name.startswith("data_device") else "not in this test")  # fmt: skip
    out = tmp_path / "s.json"
    assert suite.main(["--smoke", "--out", str(out)]) == 0
    dec = seen["decode"]
    assert dec[dec.index("--step-img-s") + 1] == "123.5" and "0,256" in dec
    r = json.loads(out.read_text())["ratios"]
    assert r["mae_tiny_zero1_over_bare_bf16"] == 2.0
    assert r["data_wait_cpu_decode_short256"] == 0.5 and r["data_wait_gpu_decode"] == 0.5
