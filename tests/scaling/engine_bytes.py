"""Child script: the tensor bytes a real DeepSpeed engine holds per rank, by part, as JSON.

Run as ``python tests/scaling/engine_bytes.py OUT.json`` (a world of one) or under ``torchrun``.
For each ZeRO stage 0-3 it builds the trainer's engine (fp32 on a CPU, gloo) over the tiny MAE
recipe, and counts unique tensor storages: parameters (ZeRO-3: each rank's ``ds_tensor``
partition) before a step, gradients after ``backward`` (the parameters' ``.grad`` and the ZeRO
optimizer's flat gradient buffers), and optimizer states after ``step`` (AdamW's ``exp_avg`` /
``exp_avg_sq`` and the fp32 master partition; the one-element ``step`` counters are left out).
"""

from __future__ import annotations

import json
import sys

import torch


def storages(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel() > 1:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def flat(value) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    return []


GRAD_BUFFERS = ("averaged_gradients", "ipg_buffer", "grad_partitions_flat_buffer")
MASTER = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def measure(stage: int) -> dict:
    from mimscale.config import derive
    from mimscale.config.paths import recipe_path
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.setup import build_engine, prepare_batch
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    dist = init_distributed()
    over = [f"train.zero_stage={stage}", "train.micro_batch=2", f"train.global_batch={2 * dist.world_size}"]
    r = load_recipe(recipe_path("mae/cpu_tiny"), over)
    torch.manual_seed(0)
    engine = build_engine(build_method(r), r, derive(r, dist.world_size, 1000), dist.device)
    module, opt = engine.module, engine.optimizer
    params = storages(getattr(p, "ds_tensor", p.data) for p in module.parameters())
    b = prepare_batch(synthetic_batch(r), dist.device, torch.float32)
    engine.backward(engine(b, b["mask"], None).loss)
    grads = storages(
        [p.grad for p in module.parameters()] + flat([getattr(opt, a, None) for a in GRAD_BUFFERS])
    )
    engine.step()
    inner = getattr(opt, "optimizer", opt)
    states = flat([s for s in inner.state.values()]) + flat([getattr(opt, a, None) for a in MASTER])
    return {"params": params, "grads": grads, "optimizer": storages(states)}


def main() -> None:
    out = {str(stage): measure(stage) for stage in range(4)}
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world": torch.distributed.get_world_size(), "stages": out}, f)


if __name__ == "__main__":
    main()
