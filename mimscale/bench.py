"""``mimscale bench``: engine step time vs the bare model step, images/s and (GPU) MFU, as JSON.

Usage: ``mimscale bench [engine] [RECIPE] [key.sub=value ...] [--steps N] [--out FILE]``.
The default recipe is MAE ViT-S/16 at 224 px. The engine step (batch preparation, DeepSpeed
forward/backward/step, the non-finite check) and the bare step (the same method's forward,
``loss.backward()``, ``torch.optim.AdamW.step()``) run on two copies of one initialisation with
the same synthetic batch, alternately in one process, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT = ["model.size=small", "train.global_batch=8", "train.micro_batch=8", "train.zero_stage=1"]


def synthetic_batch(recipe, seed: int = 0) -> dict[str, Any]:
    """Random uint8 views and a mask from the recipe's own mask generator."""
    from mimscale.masking import build_mask_generator

    b, s = recipe.train.micro_batch, recipe.model.img_size
    g = torch.Generator().manual_seed(seed)
    views = [
        torch.randint(0, 256, (b, 3, v.size, v.size), dtype=torch.uint8, generator=g)
        for v in recipe.data.views
    ]
    grid = (s // recipe.model.patch_size,) * 2
    gen = build_mask_generator(recipe.mask, grid, s, recipe.model.patch_size)
    rng = np.random.default_rng(seed)
    batch: dict[str, Any] = {
        "views": views,
        "keys": [str(i) for i in range(b)],
        "labels": torch.full((b,), -1, dtype=torch.long),
    }
    if gen is not None:
        batch["mask"] = torch.from_numpy(np.stack([gen(rng) for _ in range(b)]))
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(recipe, steps: int, warmup: int = 3) -> dict[str, Any]:
    from mimscale.config import derive
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, prepare_batch, seed_everything, train_step
    from mimscale.engine.optim import build_optimizer, use_bf16
    from mimscale.methods import build_method

    dist = init_distributed()
    seed_everything(0)
    method = build_method(recipe).to(dist.device)
    bare = copy.deepcopy(method)
    d = derive(recipe, dist.world_size, recipe.train.global_batch * 1000)
    engine = build_engine(method, recipe, d, dist.device)
    dtype = torch.bfloat16 if use_bf16(recipe, dist.device) else torch.float32
    bare = bare.to(dtype)
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
            _sync(dist.device)
            t0 = time.perf_counter()
            fn()
            _sync(dist.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return _report(recipe, dist, method, times)


def _report(recipe, dist, method, times: dict[str, list[float]]) -> dict[str, Any]:
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
        "global_batch": gb,
        "engine_step_s": eng,
        "bare_step_s": bare,
        "engine_overhead_ratio": eng / bare,
        "images_per_s": gb / eng,
        "steps_measured": len(times["engine"]),
    }
    flops = getattr(method, "flops_per_image", None)
    train = getattr(method, "train_flops_per_image", None)  # methods with forward-only passes
    if callable(flops) or callable(train):
        train_flops = train() if callable(train) else 3.0 * flops()  # backward ~ 2x forward
        out["train_flops_per_image"] = train_flops
        if dist.device.type == "cuda":
            peak = 989e12 if "H100" in torch.cuda.get_device_name() else float("nan")  # bf16 dense
            out["mfu"] = train_flops * gb / eng / dist.world_size / peak
    if dist.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def emit(result: dict[str, Any], out: str | None) -> int:
    """Print the benchmark JSON (and write it to ``out``); the exit code of every bench."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


def recipe_args(prog: str, doc: str | None, default_recipe: str, steps: int, argv: list[str] | None):
    """Parse ``[RECIPE] key.sub=value ... [--steps N] [--out FILE]`` shared by the benches.

    Returns:
        (recipe path, overrides, parsed namespace with ``steps`` and ``out``).
    """
    from mimscale.cli import recipe_path

    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("args", nargs="*", help="[RECIPE] key.sub=value ...")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    args = list(a.args)
    path = recipe_path(args.pop(0) if args and "=" not in args[0] else default_recipe)
    return path, args, a


def main(argv: list[str] | None = None) -> int:
    from mimscale.registry import load_recipe

    path, args, a = recipe_args("mimscale bench", __doc__, "mae/vit_b16.yaml", 10, argv)
    overrides = [*DEFAULT, *args] if path.name == "vit_b16.yaml" and path.parent.name == "mae" else args
    return emit(run_bench(load_recipe(path, overrides), a.steps), a.out)
