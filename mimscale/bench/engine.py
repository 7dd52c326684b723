"""``mimscale bench``: engine step time vs the bare model step, images/s and (GPU) MFU, as JSON.

Usage: ``mimscale bench [engine] [RECIPE] [key.sub=value ...] [--stages 0,1,2] [--threads N] [--steps N]
[--bare bf16,autocast] [--profile DIR] [--out FILE]``.
Without RECIPE: ``mae/vit_b16.yaml`` with the overrides in :data:`DEFAULT` (ViT-S/16 at 224 px,
batch 8, ZeRO-1); a RECIPE given is benchmarked as written (plus its overrides). The JSON names the
recipe and every override applied (``recipe``, ``overrides``). The engine step (batch preparation, DeepSpeed
forward/backward/step, the non-finite check) and the bare step (the same method's forward,
``loss.backward()``, ``torch.optim.AdamW.step()``) run on copies of one initialisation with
the same synthetic batch (pinned on a GPU, as the loader pins), alternately in one process, so
machine noise hits both alike. The bare step runs at the engine's own precision (``precision``:
bf16 parameters, fp32 parameters under bf16 ``autocast``, or fp32); ``--bare`` times it at more
precisions too (``bare_step_s_by_precision``). ``--profile DIR`` writes synchronised phase
timings and profiler tables per stage (:mod:`mimscale.bench.profile`; ``phases_s`` in the JSON).
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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mimscale.bench.common import emit, mfu, recipe_args, sync

DEFAULT_RECIPE = "mae/vit_b16.yaml"
# Applied only when no recipe is given: a ViT-S step fits any GPU and runs on a CPU.
DEFAULT = ["model.size=small", "train.global_batch=8", "train.micro_batch=8", "train.zero_stage=1"]


def run_bench(
    recipe,
    steps: int,
    warmup: int = 3,
    stages: list[int] | None = None,
    bare_precisions: list[str] | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Time the engine step(s) and the bare step alternately; the JSON-able report (module docstring).

    Args:
        recipe: the benchmarked recipe.
        steps: repetitions measured (after ``warmup``).
        warmup: repetitions run first and not measured.
        stages: ZeRO stages to build one engine each for (``None``: the recipe's own stage only).
        bare_precisions: besides the bare step at the engine's own precision (the ratio's
            denominator), bare steps at these precisions (``bf16``, ``autocast``, ``fp32``),
            reported under ``bare_step_s_by_precision``.
        profile: a folder for the synchronised phase timings and profiler tables
            (:mod:`mimscale.bench.profile`), written after the timed repetitions.
    """
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, seed_everything, train_step
    from mimscale.engine.optim import use_autocast, use_bf16

    dist = init_distributed()
    seed_everything(0)
    method = build_method_as_trained(recipe, dist.device)
    d = derive(recipe, dist.world_size, recipe.train.global_batch * 1000)
    engines = {}
    for stage in stages if stages is not None else [recipe.train.zero_stage]:
        r = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, zero_stage=stage))
        engines[stage] = build_engine(copy.deepcopy(method), r, d, dist.device)
    own = "autocast" if use_autocast(recipe) else "bf16" if use_bf16(recipe, dist.device) else "fp32"
    dtype = torch.bfloat16 if own == "bf16" else torch.float32
    # The loader pins its batches for a GPU: a pageable copy would cost the bench what training never pays.
    micro = [pin_like_loader(synthetic_batch(recipe), dist.device)] * d.grad_accum
    steps_fn: dict[Any, Callable[[], Any]] = {}
    for prec in dict.fromkeys([own, *(bare_precisions or [])]):
        steps_fn[f"bare_{prec}"] = bare_step_fn(method, recipe, d, dist.device, prec, micro)
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
    bares = {k[5:]: times.pop(k) for k in list(times) if isinstance(k, str)}
    reports = {stage: _report(recipe, dist, method, stage, t, bares[own]) for stage, t in times.items()}
    for rep in reports.values():
        rep["precision"] = own
        rep["batch_pinned"] = dist.device.type == "cuda"
        rep["bare_step_s_by_precision"] = {k: statistics.median(v) for k, v in bares.items()}
    if profile:
        from mimscale.bench.profile import profile_engines

        phases = profile_engines(engines, micro, dist.device, dtype, profile)
        for stage, rep in reports.items():
            rep["phases_s"] = phases[stage]
    if stages is None:
        return reports[recipe.train.zero_stage]
    return {"stages": {str(s): rep for s, rep in reports.items()}}


def build_method_as_trained(recipe, device: torch.device) -> torch.nn.Module:
    """The recipe's method on ``device``, with activation checkpointing set as the trainer sets it."""
    from mimscale.methods import build_method

    method = build_method(recipe).to(device)
    if recipe.train.activation_checkpointing:  # as the trainer does, for every copy
        method.set_grad_checkpointing(True)
    return method


def pin_like_loader(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors in pinned host memory where the training loader pins them
    (``pin_memory`` on a CUDA machine), so ``prepare_batch``'s copy is the asynchronous one."""
    if device.type != "cuda":
        return batch
    out = dict(batch)
    out["views"] = [v.pin_memory() for v in batch["views"]]
    for key in ("mask", "labels"):
        if key in batch:
            out[key] = batch[key].pin_memory()
    return out


def bare_step_fn(
    method: torch.nn.Module, recipe, d, device: torch.device, precision: str, micro: list[dict[str, Any]]
) -> Callable[[], None]:
    """The bare step on a copy of ``method`` at ``precision``: ``bf16`` (bf16 parameters and
    images), ``autocast`` (fp32 parameters, bf16 autocast) or ``fp32``; compiled as the engine is."""
    from mimscale.engine.loop import prepare_batch
    from mimscale.engine.optim import build_optimizer, use_compile

    bare = copy.deepcopy(method)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    bare = bare.to(dtype)
    if use_compile(recipe, device):  # bare = the same model, compiled the same way
        from mimscale.models.vit import compile_blocks

        compile_blocks(bare)
    opt, _ = build_optimizer(bare, recipe, d, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast")

    def step() -> None:
        for mb in micro:
            b = prepare_batch(mb, device, dtype)
            with amp:
                loss = bare(b, b.get("mask"), None).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


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
    pre.add_argument("--bare", default="", help="bare step also at: bf16,autocast,fp32")
    pre.add_argument("--profile", default=None, help="write phase timings and profiler tables here")
    known, rest = pre.parse_known_args(argv)
    path, args, a = recipe_args("mimscale bench", __doc__, DEFAULT_RECIPE, 10, rest)
    a.stages = [int(x) for x in known.stages.split(",")] if known.stages else None
    a.threads = known.threads
    a.bare = [x for x in known.bare.split(",") if x]
    a.profile = known.profile
    return path, (args if a.recipe_given else [*DEFAULT, *args]), a


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mimscale bench [engine]``; prints (and optionally writes) the JSON."""
    from mimscale.registry import load_recipe

    path, overrides, a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    bad = [x for x in a.bare if x not in ("bf16", "autocast", "fp32")]
    if bad:
        print(f"mimscale bench: --bare {bad[0]!r}: use bf16, autocast or fp32", file=sys.stderr)
        return 2
    recipe = load_recipe(path, overrides)
    result = run_bench(recipe, a.steps, stages=a.stages, bare_precisions=a.bare, profile=a.profile)
    return emit({"recipe": str(path), "overrides": overrides, **result}, a.out)
