"""``mimscale bench methods``: what LC-MAE and MTO cost per training step, as JSON.

Usage: ``mimscale bench methods [key.sub=value ...] [--base vit_b16|cpu_tiny] [--mto-host mae|simmim]
[--steps N] [--warmup N] [--out FILE]``. The overrides apply to every variant; the default is ViT-S/16
at 224 px, micro-batch 16, ZeRO-1 (as ``mimscale bench engine``).

Variants, one DeepSpeed engine each in one process, all fed the same synthetic images and masks:

- ``mae`` and ``lc_mae`` (``recipes/{mae,lc_mae}/BASE.yaml``): ``lc_mae_vs_mae`` is the price of
  the second masked online pass, the two no-grad momentum passes over full views and the EMA update;
- ``HOST`` and ``HOST+mto`` (``mto.enabled=true``): ``mto_overhead`` = step(HOST+mto) / step(HOST) - 1.

A step is the engine's own (:func:`mimscale.engine.loop.train_step`: batch preparation, forward,
backward, optimizer step) followed by ``after_step`` (LC-MAE's EMA update). The variants run in turn
within every iteration, so machine noise hits all of them alike; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from mimscale.bench.common import emit, recipe_file, sync

DEFAULT = ["model.size=small", "train.global_batch=16", "train.micro_batch=16", "train.zero_stage=1"]
TINY = ["train.global_batch=8", "train.micro_batch=8"]


def variants(base: str, mto_host: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (recipe path under recipes/, extra overrides)."""
    out: dict[str, tuple[str, list[str]]] = {
        "mae": (f"mae/{base}.yaml", []),
        "lc_mae": (f"lc_mae/{base}.yaml", []),
    }
    out.setdefault(mto_host, (f"{mto_host}/{base}.yaml", []))
    out[f"{mto_host}+mto"] = (f"{mto_host}/{base}.yaml", ["mto.enabled=true"])
    return out


def _engine(recipe, dist) -> Any:
    """A DeepSpeed engine for ``recipe`` as the trainer builds it (schedule horizon 1000 steps)."""
    from mimscale.config import derive
    from mimscale.engine.loop import build_engine, seed_everything
    from mimscale.methods import build_method

    seed_everything(0)
    method = build_method(recipe).to(dist.device)
    d = derive(recipe, dist.world_size, recipe.train.global_batch * 1000)
    method.set_total_steps(d.total_steps)
    return build_engine(method, recipe, d, dist.device), d.grad_accum


def run(recipes: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """Time every variant's step, alternating; returns the JSON-able report.

    Args:
        recipes: variant name -> validated recipe.
        steps: timed iterations (each runs every variant once).
        warmup: untimed iterations first.
    """
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import train_step
    from mimscale.engine.optim import use_bf16

    dist = init_distributed()
    steps_fn: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in recipes}
    for name, r in recipes.items():
        engine, accum = _engine(r, dist)
        dtype = torch.bfloat16 if use_bf16(r, dist.device) else torch.float32
        micro = [synthetic_batch(r, seed=0)] * accum  # the same images and masks for every variant
        steps_fn[name] = (engine, micro, dtype)
    for i in range(warmup + steps):
        for name, (engine, micro, dtype) in steps_fn.items():
            sync(dist.device)
            t0 = time.perf_counter()
            train_step(engine, micro, dist.device, dtype)
            engine.module.after_step(i + 1)
            sync(dist.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return _report(recipes, steps_fn, times, dist)


def _report(recipes, steps_fn, times: dict[str, list[float]], dist) -> dict[str, Any]:
    any_r = next(iter(recipes.values()))
    out: dict[str, Any] = {
        "size": any_r.model.size,
        "img_size": any_r.model.img_size,
        "patch_size": any_r.model.patch_size,
        "global_batch": any_r.train.global_batch,
        "device": torch.cuda.get_device_name() if dist.device.type == "cuda" else str(dist.device),
        "world_size": dist.world_size,
        "steps_measured": len(next(iter(times.values()))),
        "variants": {},
    }
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, r in recipes.items():
        method = steps_fn[name][0].module
        row = {"step_s": med[name], "images_per_s": r.train.global_batch / med[name]}
        train_flops = method.train_flops_per_image()
        if train_flops is not None:
            row["train_flops_per_image"] = train_flops
        out["variants"][name] = row
    out["lc_mae_vs_mae"] = med["lc_mae"] / med["mae"]
    host = next(n[: -len("+mto")] for n in med if n.endswith("+mto"))
    out["mto_host"] = host
    out["mto_overhead"] = med[f"{host}+mto"] / med[host] - 1.0
    return out


def main(argv: list[str] | None = None) -> int:
    from mimscale.registry import load_recipe

    p = argparse.ArgumentParser(prog="mimscale bench methods", description=__doc__)
    p.add_argument("overrides", nargs="*", help="key.sub=value, applied to every variant")
    p.add_argument("--base", choices=["vit_b16", "cpu_tiny"], default="vit_b16")
    p.add_argument("--mto-host", choices=["mae", "simmim"], default="mae")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    common = [*(DEFAULT if a.base == "vit_b16" else TINY), *a.overrides]
    recipes = {
        name: load_recipe(recipe_file(path), [*common, *extra])
        for name, (path, extra) in variants(a.base, a.mto_host).items()
    }
    return emit(run(recipes, a.steps, a.warmup), a.out)
