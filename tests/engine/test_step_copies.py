"""The training step makes no pageable host-to-device copy.

A copy from pageable host memory is synchronous on a GPU (the benchmark once paid 5 ms per step
for one). No GPU here, so the step runs with its device being ``meta``: every op that reads a
host tensor and writes a device tensor is a host-to-device copy. Each must be of a tensor the
loader pins (the batch's ``views``, ``mask``, ``mask_noise``, ``labels``: ``pin_memory`` on a
CUDA machine pins every tensor of the batch) and asynchronous (``non_blocking``); a tensor built
on the host inside the step and then moved (a per-step ``torch.tensor(...).to(device)``) fails
here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from launch import REPO
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")


class HostToDevice(TorchDispatchMode):
    """Records (op, host inputs, non_blocking) of every op with a host input and a device output.
    0-d host tensors are left out: PyTorch passes them to device kernels by value, no copy."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, list[torch.Tensor], bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        host = [
            t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        ]
        host = [t for t in host if t.dim() > 0]
        dev = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        if host and dev:
            self.copies.append((str(func), host, bool(kwargs.get("non_blocking", False))))
        return out


class MetaEngine:
    """What ``train_step`` calls on a DeepSpeed engine, for a method on the meta device."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def _pinned_by_loader(batch: dict[str, Any]) -> list[torch.Tensor]:
    return [*batch["views"], *(batch[k] for k in ("mask", "mask_noise", "labels") if k in batch)]


@pytest.mark.parametrize("recipe", ["mae/cpu_tiny.yaml", "simmim/cpu_tiny.yaml"])
def test_every_host_to_device_copy_is_of_a_pinned_batch_tensor_and_async(recipe: str) -> None:
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.loop import train_step
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    r = load_recipe(REPO / "recipes" / recipe, ["train.global_batch=4", "train.micro_batch=4"])
    engine = MetaEngine(build_method(r).to(META))
    batch = synthetic_batch(r)
    with HostToDevice() as seen:
        outs, _ = train_step(engine, [batch], META, torch.float32)
    assert outs[0].loss.device == META  # the whole step ran on the "device"
    pinned = _pinned_by_loader(batch)
    assert seen.copies, "no host-to-device copy seen: the batch must reach the device"
    for op, host, non_blocking in seen.copies:
        for t in host:
            assert any(t is p for p in pinned), (
                f"{op} copies a host tensor the loader does not pin: {t.shape}"
            )
        assert non_blocking, f"{op}: a synchronous host-to-device copy"


def test_the_guard_sees_a_pageable_copy() -> None:
    """The guard itself: a host tensor made inside the step and moved is reported."""
    with HostToDevice() as seen:
        torch.arange(4).to(META)
    assert len(seen.copies) == 1 and seen.copies[0][2] is False
