"""Guard against per-parameter-tensor work creeping into the engine step.

On a GPU the step is host-bound when the engine issues small ops per parameter tensor (issue 24:
DeepSpeed's bf16 optimizer cast, norm, copy and narrow for each of ~400 tensors of ViT-L, ~2,000
ops per step). Counted here on a CPU: the aten ops dispatched by one engine step minus those of
the bare step (forward, backward, fused AdamW) on the same tiny model, at depths 2 and 4; the
difference per extra parameter tensor is the engine's per-tensor overhead. The limits are the
figures reached (torch 2.11, DeepSpeed 0.19.8): a change that adds per-tensor work fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from launch import REPO
from torch.utils._python_dispatch import TorchDispatchMode

# (precision, ZeRO stage) -> extra ops per parameter tensor, as reached. autocast = fp32
# parameters: ZeRO-0 steps the fused AdamW itself (0 extra); ZeRO-1/2 pay DeepSpeed's gradient
# bucketing (9 / 10 per tensor). bf16 = DeepSpeed's bf16 optimizer at ZeRO-0 (25 per tensor).
LIMITS = {("autocast", 0): 0, ("autocast", 1): 9, ("autocast", 2): 10, ("bf16", 0): 25}


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(precision: str, stage: int, depth: int) -> tuple[int, int, int]:
    """(parameter tensors, ops of one engine step, ops of one bare step), after one warm-up step."""
    from mimscale.bench.engine import bare_step_fn, build_method_as_trained
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, seed_everything, train_step
    from mimscale.registry import load_recipe

    over = [f"train.zero_stage={stage}", f"train.precision={precision}", f"model.depth={depth}",
            "model.embed_dim=32", "train.global_batch=4", "train.micro_batch=4"]  # fmt: skip
    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", over)
    dist = init_distributed()
    seed_everything(0)
    d = derive(r, 1, 400)
    method = build_method_as_trained(r, dist.device)
    engine = build_engine(copy.deepcopy(method), r, d, dist.device)
    micro = [synthetic_batch(r)]
    bare = bare_step_fn(method, r, d, dist.device, precision, micro)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    train_step(engine, micro, dist.device, dtype)
    bare()
    with CountOps() as eng:
        train_step(engine, micro, dist.device, dtype)
    with CountOps() as ref:
        bare()
    return sum(p.requires_grad for p in method.parameters()), eng.n, ref.n


@pytest.mark.parametrize(("precision", "stage"), list(LIMITS))
def test_engine_ops_per_parameter_tensor_stay_at_the_figure_reached(precision: str, stage: int) -> None:
    n2, e2, b2 = _ops(precision, stage, 2)
    n4, e4, b4 = _ops(precision, stage, 4)
    assert n4 > n2 and b4 > b2  # the deeper model has more tensors and the bare step more ops
    per_tensor = ((e4 - b4) - (e2 - b2)) / (n4 - n2)
    assert per_tensor <= LIMITS[precision, stage], (
        f"engine step at {precision}, ZeRO-{stage}: {per_tensor:.1f} extra ops per parameter tensor "
        f"(reached: {LIMITS[precision, stage]}); engine {e2}/{e4} vs bare {b2}/{b4} ops at depth 2/4"
    )
