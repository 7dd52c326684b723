"""``mimscale bench``: engine step time vs the bare model step, images/s and (GPU) MFU, as JSON.

Usage: ``mimscale bench [engine] [RECIPE] [key.sub=value ...] [--stages 0,1,2] [--threads N] [--steps N]
[--out FILE]``.
Without RECIPE: ``mae/vit_b16.yaml`` with the overrides in :data:`DEFAULT` (ViT-S/16 at 224 px,
batch 8, ZeRO-1); a RECIPE given is benchmarked as written (plus its overrides). The JSON names the
recipe and every override applied (``recipe``, ``overrides``). The engine step (batch preparation, DeepSpeed
forward/backward/step, the non-finite check) and the bare step (the same method's forward,
``loss.backward()``, ``torch.optim.AdamW.step()``) run on copies of one initialisation with
the same synthetic batch, alternately in one process, so machine noise hits both alike.
``--stages`` builds one engine per ZeRO stage and alternates all of them with the bare step (one
line per stage under ``stages``). Besides the ratio of the medians, each engine reports the median
and quartiles of the per-repetition ratios (engine step / the bare step just before it): on a
shared machine their spread says how far to trust a few-percent difference. ``--threads`` sets
torch's intra-op threads: on a CPU shared with other jobs, use 1 — with 2 or more, every parallel
region waits for a descheduled thread, and the bare step's fused AdamW over 252 separate tensors
(ViT-S MAE) measured 650-1980 ms against 24-27 ms for the same AdamW on one flat tensor, so the
ratio then measures the machine's load rather than the engine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mimscale.bench.common import emit, mfu, recipe_args, sync

DEFAULT_RECIPE = "mae/vit_b16.yaml"
# Applied only when no recipe is given: a ViT-S step fits any GPU and runs on a CPU.
DEFAULT = ["model.size=small", "train.global_batch=8", "train.micro_batch=8", "train.zero_stage=1"]


def run_bench(recipe, steps: int, warmup: int = 3, stages: list[int] | None = None) -> dict[str, Any]:
    """Time the engine step(s) and the bare step alternately; the JSON-able report (module docstring).

    Args:
        recipe: the benchmarked recipe.
        steps: repetitions measured (after ``warmup``).
        warmup: repetitions run first and not measured.
        stages: ZeRO stages to build one engine each for (``None``: the recipe's own stage only).
    """
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, prepare_batch, seed_everything, train_step
    from mimscale.engine.optim import build_optimizer, use_bf16, use_compile
    from mimscale.methods import build_method

    dist = init_distributed()
    seed_everything(0)
    method = build_method(recipe).to(dist.device)
    if recipe.train.activation_checkpointing:  # as the trainer does, for every copy
        method.set_grad_checkpointing(True)
    bare = copy.deepcopy(method)
    d = derive(recipe, dist.world_size, recipe.train.global_batch * 1000)
    engines = {}
    for stage in stages if stages is not None else [recipe.train.zero_stage]:
        r = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, zero_stage=stage))
        engines[stage] = build_engine(copy.deepcopy(method), r, d, dist.device)
    dtype = torch.bfloat16 if use_bf16(recipe, dist.device) else torch.float32
    bare = bare.to(dtype)
    if use_compile(recipe, dist.device):  # bare = the same model, compiled the same way
        from mimscale.models.vit import compile_blocks

        compile_blocks(bare)
    bare_opt, _ = build_optimizer(bare, recipe, d, dist.device)
    batch = synthetic_batch(recipe)
    micro = [batch] * d.grad_accum

    def bare_step() -> None:
        for mb in micro:
            b = prepare_batch(mb, dist.device, dtype)
            bare(b, b.get("mask"), None).loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    steps_fn: dict[Any, Callable[[], Any]] = {"bare": bare_step}
    for stage, engine in engines.items():
        steps_fn[stage] = functools.partial(train_step, engine, micro, dist.device, dtype)
    times: dict[Any, list[float]] = {name: [] for name in steps_fn}
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        for name, fn in steps_fn.items():
            sync(dist.device)
            t0 = time.perf_counter()
            fn()
            sync(dist.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    bare_times = times.pop("bare")
    reports = {stage: _report(recipe, dist, method, stage, t, bare_times) for stage, t in times.items()}
    if stages is None:
        return reports[recipe.train.zero_stage]
    return {"stages": {str(s): rep for s, rep in reports.items()}}


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return [q[0], q[1], q[2]]


def _report(
    recipe, dist, method, stage: int, engine_times: list[float], bare_times: list[float]
) -> dict[str, Any]:
    from mimscale.engine.optim import use_compile

    eng, bare = statistics.median(engine_times), statistics.median(bare_times)
    paired = [e / b for e, b in zip(engine_times, bare_times, strict=True)]
    gb = recipe.train.global_batch
    out: dict[str, Any] = {
        "method": recipe.method,
        "size": recipe.model.size,
        "img_size": recipe.model.img_size,
        "patch_size": recipe.model.patch_size,
        "device": str(dist.device),
        "threads": torch.get_num_threads(),
        "world_size": dist.world_size,
        "zero_stage": stage,
        "compiled": use_compile(recipe, dist.device),
        "activation_checkpointing": recipe.train.activation_checkpointing,
        "global_batch": gb,
        "engine_step_s": eng,
        "bare_step_s": bare,
        "engine_overhead_ratio": eng / bare,
        # per-repetition engine/bare: [first quartile, median, third quartile]
        "engine_overhead_ratio_quartiles": _quartiles(paired),
        "images_per_s": gb / eng,
        "steps_measured": len(engine_times),
    }
    train_flops = method.train_flops_per_image()
    if train_flops is not None:
        out["train_flops_per_image"] = train_flops
        if dist.device.type == "cuda":
            out.update(mfu(train_flops * gb / eng / dist.world_size, torch.cuda.get_device_name()))
    if dist.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def parse_args(argv: list[str] | None) -> tuple[Path, list[str], argparse.Namespace]:
    """(recipe path, overrides, namespace): :data:`DEFAULT` comes first only when no recipe is given;
    ``namespace.stages`` is the list given with ``--stages`` (None without it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stages", default=None, help="comma-separated ZeRO stages, e.g. 0,1,2")
    pre.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    known, rest = pre.parse_known_args(argv)
    path, args, a = recipe_args("mimscale bench", __doc__, DEFAULT_RECIPE, 10, rest)
    a.stages = [int(x) for x in known.stages.split(",")] if known.stages else None
    a.threads = known.threads
    return path, (args if a.recipe_given else [*DEFAULT, *args]), a


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mimscale bench [engine]``; prints (and optionally writes) the JSON."""
    from mimscale.registry import load_recipe

    path, overrides, a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run_bench(load_recipe(path, overrides), a.steps, stages=a.stages)
    return emit({"recipe": str(path), "overrides": overrides, **result}, a.out)
