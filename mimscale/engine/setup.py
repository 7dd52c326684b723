"""Building blocks of a run: seeding, batch preparation, the DeepSpeed engine, the teacher.

Shared by the training loop and the benchmark so both measure the same engine.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from mimscale.config import Derived, Recipe
from mimscale.data.normalize import normalize_uint8
from mimscale.engine.optim import build_optimizer, deepspeed_config, use_bf16, use_compile


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keep_valid_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its padding / replacement rows (``valid = False``), so they get no gradient.

    Exact epochs pad the tail and undecodable samples are replaced by a decodable one; those
    rows exist only so every rank runs the same number of steps. Dropping them here, before the
    method, treats every method the same way. A batch with no valid row is returned whole: the
    step still runs (ZeRO's collectives need every rank), and the trainer zeroes its loss.

    Args:
        batch: a collated batch; ``valid`` bool ``[B]``; per-sample entries ``views`` (list of
            ``[B, ...]``) or ``jpegs`` (``data.decode: gpu``), ``crops``, ``labels``, ``keys``;
            ``mask`` and ``mask_noise`` ``[B * R, N]`` (R masks per sample, rows ``b*R .. b*R+R-1``).

    Returns:
        A new dict with only the valid rows (the same dict when every row is valid).
    """
    valid = batch.get("valid")
    if valid is None or bool(valid.all()) or not bool(valid.any()):
        return batch
    keep = valid.nonzero().squeeze(1)
    out = dict(batch)
    if "views" in batch:
        out["views"] = [v[keep.to(v.device)] for v in batch["views"]]
    if "jpegs" in batch:  # data.decode: gpu, before decoding
        out["jpegs"] = [batch["jpegs"][i] for i in keep.tolist()]
    for key in ("crops", "labels", "valid", "orientation"):
        if key in batch:
            out[key] = batch[key][keep]
    if "keys" in batch:
        out["keys"] = [batch["keys"][i] for i in keep.tolist()]
    if "teacher" in batch:  # precomputed targets: one row per view
        out["teacher"] = {k: v[keep] for k, v in batch["teacher"].items()}
    if "mask" in batch:
        repeats = batch["mask"].shape[0] // valid.shape[0]
        rows = (keep.unsqueeze(1) * repeats + torch.arange(repeats)).flatten()
        out["mask"] = batch["mask"][rows]
        if "mask_noise" in batch:  # laid out as the mask
            out["mask_noise"] = batch["mask_noise"][rows]
    return out


def prepare_batch(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Valid rows only (:func:`keep_valid_rows`), uint8 views -> device, ImageNet-normalised
    ``images`` in the engine's dtype.

    A ``data.decode: gpu`` batch (``jpegs`` instead of ``views``) is decoded here, on ``device``
    (:func:`mimscale.data.gpu_decode.decode_batch`), after padding rows are dropped; a sample no
    decoder reads becomes one more dropped row."""
    batch = keep_valid_rows(batch)
    if "jpegs" in batch:
        from mimscale.data.gpu_decode import decode_batch

        batch = keep_valid_rows(decode_batch(batch, device))
    views = [v.to(device, non_blocking=True) for v in batch["views"]]
    out = dict(batch)
    out["views"] = views
    out["images"] = [normalize_uint8(v, dtype) for v in views]
    if "mask" in batch:
        out["mask"] = batch["mask"].to(device, non_blocking=True)
        if batch["mask"].device.type == "cpu" and batch["mask"].dim() == 2:
            # Counted here on the host copy, so the encoder needs no device sync for |V|.
            from mimscale.models.vit import _equal_visible_count

            out["mask"].visible_count = _equal_visible_count(batch["mask"])
    if "mask_noise" in batch:
        out["mask_noise"] = batch["mask_noise"].to(device, non_blocking=True)
    if "labels" in batch:
        out["labels"] = batch["labels"].to(device, non_blocking=True)
    return out


def cast_buffers_bf16(module: torch.nn.Module) -> None:
    """Floating buffers follow the bf16 parameters, except normalisation statistics.

    DeepSpeed casts parameters only; a float32 buffer that is combined with them (timm Beit's
    fixed ``k_bias``, concatenated into the qkv bias) then breaks ``F.linear`` on the GPU.
    BatchNorm running statistics stay fp32.
    """
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            continue
        for name, buf in m.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != torch.bfloat16:
                setattr(m, name, buf.to(torch.bfloat16))


def build_engine(method: torch.nn.Module, r: Recipe, d: Derived, device: torch.device):
    """``deepspeed.initialize`` with our optimizer groups, schedule and JSON (used by the
    trainer and the benchmark alike)."""
    import deepspeed

    from mimscale.engine.distributed import skip_cpu_shm_allreduce
    from mimscale.engine.flat_grads import keep_flat_grad_partition

    skip_cpu_shm_allreduce()  # where no process group was set up yet (deepspeed.initialize does it)
    method.to(device)
    if use_compile(r, device):
        from mimscale.models.vit import compile_blocks

        compile_blocks(method)
    opt, sched = build_optimizer(method, r, d, device)
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(r, d, device)
    )
    if engine.dp_world_size == 1 and r.train.zero_stage == 0:
        # DeepSpeed's own switch (its pipeline engine turns it off too): a world of one has
        # nothing to all-reduce, yet allreduce_no_retain would flatten and copy every gradient.
        engine.enable_backward_allreduce = False
    keep_flat_grad_partition(engine.optimizer)  # ZeRO-1/2 on a CPU: no fresh flat gradient per step
    if use_bf16(r, device):
        cast_buffers_bf16(engine.module)
    return engine


def build_target_provider(recipe: Recipe, device: torch.device) -> Any:
    """The method's frozen target provider, or None when the method needs no teacher."""
    from mimscale.methods import METHODS

    if not METHODS[recipe.method].needs_teacher:
        return None
    if recipe.teacher.source == "precomputed":  # targets come with the batch, decoded on the device
        from mimscale.targets.provider import build_precomputed_provider

        return build_precomputed_provider(recipe, device)
    from mimscale.teachers import build_provider

    return build_provider(recipe, device)
