"""The ZeRO settings we choose reach DeepSpeed's optimizer, and the device-side non-finite skip
still reaches the optimizer that DeepSpeed steps at ZeRO-1 and ZeRO-2 (one rank, CPU, gloo)."""

from __future__ import annotations

import pytest
import torch
from launch import REPO

from mimscale.engine.optim import CPU_REDUCE_BUCKET, deepspeed_config, zero_section

RECIPE = REPO / "recipes/mae/cpu_tiny.yaml"
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_zero_sections_per_stage_and_device() -> None:
    # ZeRO-1 keeps gradients whole: no staging copies on any device; CPU buckets stay heap-sized.
    assert zero_section(1, CPU) == {
        "stage": 1,
        "contiguous_gradients": False,
        "reduce_bucket_size": CPU_REDUCE_BUCKET,
    }
    assert zero_section(1, GPU) == {"stage": 1, "contiguous_gradients": False}
    assert zero_section(2, CPU) == {
        "stage": 2,
        "contiguous_gradients": False,
        "reduce_bucket_size": CPU_REDUCE_BUCKET,
    }
    assert zero_section(2, GPU) == {"stage": 2}  # DeepSpeed's GPU defaults
    assert zero_section(0, CPU) == {"stage": 0}
    assert CPU_REDUCE_BUCKET * 4 < 32 * 2**20  # below glibc's largest mmap threshold (fp32)


def _recipe(stage: int):
    from mimscale.registry import load_recipe

    return load_recipe(RECIPE, [f"train.zero_stage={stage}", "train.global_batch=8", "train.micro_batch=8"])


@pytest.mark.parametrize("stage", [1, 2])
def test_engine_takes_the_settings_and_the_skip_flag(stage: int) -> None:
    """DeepSpeed's ZeRO optimizer runs with our buckets; a step flagged bad on the device leaves
    the weights as they were (found_inf reaches the flat AdamW DeepSpeed steps), a good one moves them."""
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import _skip_if, base_optimizer, build_engine, prepare_batch, seed_everything
    from mimscale.methods import build_method

    r = _recipe(stage)
    dist = init_distributed()
    seed_everything(0)
    d = derive(r, dist.world_size, 8 * 100)
    cfg = deepspeed_config(r, d, dist.device)
    assert zero_section(stage, dist.device).items() <= cfg["zero_optimization"].items()
    engine = build_engine(build_method(r), r, d, dist.device)
    zopt = engine.optimizer
    assert type(zopt).__name__ == "DeepSpeedZeroOptimizer"
    assert zopt.contiguous_gradients is False and zopt.reduce_bucket_size == CPU_REDUCE_BUCKET
    assert base_optimizer(engine) is zopt.optimizer  # the loop sets found_inf on what DeepSpeed steps

    b = prepare_batch(synthetic_batch(r), dist.device, torch.float32)

    def step(bad: float) -> float:
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.backward(engine(b, b.get("mask"), None).loss)
        _skip_if(base_optimizer(engine), torch.tensor(bad))
        engine.step()
        return max(
            (p.detach() - q).abs().max().item()
            for p, q in zip(engine.module.parameters(), before, strict=True)
        )

    assert step(1.0) == 0.0
    assert step(0.0) > 0.0
