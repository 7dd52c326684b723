"""A persistent flat gradient partition for DeepSpeed's ZeRO-1/2 optimizer on a CPU.

DeepSpeed 0.19's ``DeepSpeedZeroOptimizer.step`` flattens each group's gradient pieces
(``averaged_gradients[i]``, a list) into a new tensor of the partition's size, hands it to the
optimizer as ``.grad`` and drops it after the step. On a CPU a partition of any size (ViT-S: ~88 MB
fp32) is above glibc's mmap threshold, so that tensor is mapped and page-faulted anew every step:
the last few percent between the ZeRO-2 engine step and the bare step (issue 20, item 6).

``step`` already takes a gradient group that owns its flat partition: a list with a
``flat_partition`` attribute (``_get_preflattened_grad_partition``, the hook DeepSpeed's compiler
passes use). :func:`keep_flat_grad_partition` makes the two places that build those lists at the
accumulation boundary (``get_flat_partition(..., return_tensor_list=True)``) copy the pieces, in
order, into one buffer kept per group, and return them with it: the same values ``step`` would
have flattened (the weights stay bitwise the same), written into memory mapped once. Every other
call of ``get_flat_partition`` (the checkpoint code keeps its results) is passed through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["keep_flat_grad_partition"]


class _FlatGradGroup(list):
    """A gradient group as DeepSpeed's ``step`` reads it: the pieces, plus ``flat_partition``."""

    flat_partition: torch.Tensor


def keep_flat_grad_partition(optimizer: Any) -> bool:
    """Give a CPU ZeRO-1/2 optimizer a persistent flat gradient buffer per parameter group.

    Args:
        optimizer: ``engine.optimizer`` after ``deepspeed.initialize``.

    Returns:
        True when installed: a ZeRO-1/2 optimizer without CPU offload (which keeps fp32 gradients
        of its own) on a CPU, in a DeepSpeed whose ``step`` reads pre-flattened groups. Elsewhere
        nothing changes (a GPU's caching allocator makes the per-step tensor cheap, and a buffer
        held through forward and backward would raise peak memory by one partition).
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if not hasattr(optimizer, "_get_preflattened_grad_partition"):
        return False  # a DeepSpeed whose step does not read flat_partition
    if torch.device(optimizer.device).type != "cpu":
        return False
    buffers: dict[int, torch.Tensor] = {}
    build = optimizer.get_flat_partition  # the class's method, bound

    def get_flat_partition(
        tensor_list, first_offset, partition_size, dtype, device, param_group_idx, return_tensor_list=False
    ):
        pieces = build(
            tensor_list, first_offset, partition_size, dtype, device, param_group_idx, return_tensor_list
        )
        if not return_tensor_list:
            return pieces
        n = sum(t.numel() for t in pieces)
        buf = buffers.get(param_group_idx)
        if buf is None or buf.numel() != n or buf.dtype != pieces[0].dtype:
            buf = buffers[param_group_idx] = torch.empty(n, dtype=pieces[0].dtype, device=pieces[0].device)
        torch.cat([t.reshape(-1) for t in pieces], out=buf)
        group = _FlatGradGroup(pieces)
        group.flat_partition = buf
        return group

    optimizer.get_flat_partition = get_flat_partition
    optimizer.mimscale_flat_grads = buffers  # for the tests: the buffers, one per group
    return True
