"""ZeRO-1/2 on a CPU: the step takes each group's gradients from one persistent flat buffer instead
of flattening them into a fresh tensor (mapped and page-faulted anew each step above glibc's mmap
threshold), and the weights stay bitwise what DeepSpeed's own flattening gives."""

from __future__ import annotations

import copy

import pytest
import torch
from launch import REPO


def _engines(stage: int):
    from mimscale.bench.engine import build_method_as_trained
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, seed_everything
    from mimscale.registry import load_recipe

    over = [f"train.zero_stage={stage}", "train.precision=fp32", "model.depth=2", "model.embed_dim=32",
            "train.global_batch=8", "train.micro_batch=4"]  # fmt: skip
    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", over)
    dist = init_distributed()
    seed_everything(0)
    method = build_method_as_trained(r, dist.device)
    kept = build_engine(copy.deepcopy(method), r, derive(r, 1, 400), dist.device)
    plain = build_engine(copy.deepcopy(method), r, derive(r, 1, 400), dist.device)
    del plain.optimizer.get_flat_partition  # DeepSpeed's own method again
    micro = [synthetic_batch(r, seed=i) for i in range(2)]  # 2 micro-batches: accumulation
    return kept, plain, micro, dist.device


@pytest.mark.parametrize("stage", [1, 2])
def test_the_step_reads_one_persistent_buffer_and_the_weights_do_not_change(stage: int) -> None:
    from mimscale.engine.loop import train_step

    kept, plain, micro, device = _engines(stage)
    flattened = {"kept": 0, "plain": 0}
    for name, engine in (("kept", kept), ("plain", plain)):
        opt = engine.optimizer
        original = opt.flatten_dense_tensors_aligned

        def counting(*a, _name=name, _original=original, **k):
            flattened[_name] += 1
            return _original(*a, **k)

        opt.flatten_dense_tensors_aligned = counting
    start = [p.detach().clone() for p in kept.module.parameters()]
    ptrs = []
    for _ in range(3):
        train_step(kept, micro, device, torch.float32)
        train_step(plain, micro, device, torch.float32)
        ptrs.append([b.data_ptr() for b in kept.optimizer.mimscale_flat_grads.values()])
    groups = len(plain.optimizer.bit16_groups)  # decay / no decay
    assert groups >= 2 and flattened == {"kept": 0, "plain": 3 * groups}  # each group, each step
    assert len(ptrs[0]) == groups and ptrs[0] == ptrs[1] == ptrs[2]  # the same memory every step
    for (n, a), (_, b) in zip(kept.module.named_parameters(), plain.module.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for a, b in zip(kept.module.parameters(), start, strict=True))  # trained


def test_not_installed_without_zero_1_2() -> None:
    from mimscale.engine.flat_grads import keep_flat_grad_partition

    assert keep_flat_grad_partition(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)) is False
