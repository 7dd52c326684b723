"""``mimscale bench``: engine step time vs the bare model step, images/s and (GPU) MFU, as JSON.

Usage: ``mimscale bench [engine] [RECIPE] [key.sub=value ...] [--steps N] [--out FILE]``.
Without RECIPE: ``mae/vit_b16.yaml`` with the overrides in :data:`DEFAULT` (ViT-S/16 at 224 px,
batch 8, ZeRO-1); a RECIPE given is benchmarked as written (plus its overrides). The JSON names the
recipe and every override applied (``recipe``, ``overrides``). The engine step (batch preparation, DeepSpeed
forward/backward/step, the non-finite check) and the bare step (the same method's forward,
``loss.backward()``, ``torch.optim.AdamW.step()``) run on two copies of one initialisation with
the same synthetic batch, alternately in one process, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mimscale.bench.common import emit, recipe_args, sync

DEFAULT_RECIPE = "mae/vit_b16.yaml"
# Applied only when no recipe is given: a ViT-S step fits any GPU and runs on a CPU.
DEFAULT = ["model.size=small", "train.global_batch=8", "train.micro_batch=8", "train.zero_stage=1"]


def run_bench(recipe, steps: int, warmup: int = 3) -> dict[str, Any]:
    """Time the engine step and the bare step alternately; the JSON-able report (module docstring)."""
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, prepare_batch, seed_everything, train_step
    from mimscale.engine.optim import build_optimizer, use_bf16, use_compile
    from mimscale.methods import build_method

    dist = init_distributed()
    seed_everything(0)
    method = build_method(recipe).to(dist.device)
    if recipe.train.activation_checkpointing:  # as the trainer does, for both copies
        method.set_grad_checkpointing(True)
    bare = copy.deepcopy(method)
    d = derive(recipe, dist.world_size, recipe.train.global_batch * 1000)
    engine = build_engine(method, recipe, d, dist.device)
    dtype = torch.bfloat16 if use_bf16(recipe, dist.device) else torch.float32
    bare = bare.to(dtype)
    if use_compile(recipe, dist.device):  # bare = the same model, compiled the same way
        from mimscale.models.vit import compile_blocks

        compile_blocks(bare)
    bare_opt, _ = build_optimizer(bare, recipe, d, dist.device)
    batch = synthetic_batch(recipe)
    micro = [batch] * d.grad_accum

    def engine_step() -> None:
        train_step(engine, micro, dist.device, dtype)

    def bare_step() -> None:
        for mb in micro:
            b = prepare_batch(mb, dist.device, dtype)
            bare(b, b.get("mask"), None).loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"engine": [], "bare": []}
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        for name, fn in (("engine", engine_step), ("bare", bare_step)):
            sync(dist.device)
            t0 = time.perf_counter()
            fn()
            sync(dist.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return _report(recipe, dist, method, times)


def _report(recipe, dist, method, times: dict[str, list[float]]) -> dict[str, Any]:
    from mimscale.engine.optim import use_compile

    eng, bare = statistics.median(times["engine"]), statistics.median(times["bare"])
    gb = recipe.train.global_batch
    out: dict[str, Any] = {
        "method": recipe.method,
        "size": recipe.model.size,
        "img_size": recipe.model.img_size,
        "patch_size": recipe.model.patch_size,
        "device": str(dist.device),
        "world_size": dist.world_size,
        "zero_stage": recipe.train.zero_stage,
        "compiled": use_compile(recipe, dist.device),
        "activation_checkpointing": recipe.train.activation_checkpointing,
        "global_batch": gb,
        "engine_step_s": eng,
        "bare_step_s": bare,
        "engine_overhead_ratio": eng / bare,
        "images_per_s": gb / eng,
        "steps_measured": len(times["engine"]),
    }
    train_flops = method.train_flops_per_image()
    if train_flops is not None:
        out["train_flops_per_image"] = train_flops
        if dist.device.type == "cuda":
            peak = 989e12 if "H100" in torch.cuda.get_device_name() else float("nan")  # bf16 dense
            out["mfu"] = train_flops * gb / eng / dist.world_size / peak
    if dist.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def parse_args(argv: list[str] | None) -> tuple[Path, list[str], argparse.Namespace]:
    """(recipe path, overrides, namespace): :data:`DEFAULT` comes first only when no recipe is given."""
    path, args, a = recipe_args("mimscale bench", __doc__, DEFAULT_RECIPE, 10, argv)
    return path, (args if a.recipe_given else [*DEFAULT, *args]), a


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mimscale bench [engine]``; prints (and optionally writes) the JSON."""
    from mimscale.registry import load_recipe

    path, overrides, a = parse_args(argv)
    result = run_bench(load_recipe(path, overrides), a.steps)
    return emit({"recipe": str(path), "overrides": overrides, **result}, a.out)
