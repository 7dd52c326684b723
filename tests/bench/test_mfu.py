"""MFU uses the bf16 dense peak of the GPU by name; an unknown GPU gets null and a reason, never NaN."""

from __future__ import annotations

import json
import math

import pytest

from mimscale.bench.common import mfu, peak_bf16_flops


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),  # contains "H100": the PCIe part must win
        ("NVIDIA H200", 989e12),  # the name the H200 printed NaN for
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),  # contained in "A100": the A100 rows must not shadow it, nor it them
    ],
)
def test_peak_by_gpu_name(name: str, peak: float) -> None:
    assert peak_bf16_flops(name) == (peak, None)


def test_mfu_of_a_known_gpu_is_the_share_of_its_peak() -> None:
    # ViT-L/16 MAE: 2,106 img/s at ~0.37 TFLOP per trained image on one H200
    r = mfu(2106 * 0.37e12, "NVIDIA H200")
    assert r["mfu"] == pytest.approx(2106 * 0.37e12 / 989e12) and "mfu_unknown" not in r


def test_unknown_gpu_gets_null_and_a_reason() -> None:
    r = mfu(1e14, "NVIDIA GeForce RTX 4090")
    assert r["mfu"] is None and r["peak_flops"] is None and "RTX 4090" in r["mfu_unknown"]
    text = json.dumps(r, allow_nan=False)  # raises on NaN
    assert "NaN" not in text and not any(isinstance(v, float) and math.isnan(v) for v in r.values())


def test_the_planner_uses_the_same_peaks() -> None:
    """`mimscale plan`'s GPUs take their peak from this table (one table, not two)."""
    from mimscale.scaling.plan import GPUS, peak_tflops

    assert {n: peak_tflops(n) for n in GPUS} == {
        "H200": 989.0, "H100": 989.0, "A100-80GB": 312.0, "A100-40GB": 312.0, "L40S": 362.0, "A10": 125.0,
    }  # fmt: skip
