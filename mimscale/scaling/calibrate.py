"""``mimscale plan --calibrate``: a few real engine steps on this device give the MFU and peak memory.

The steps are :func:`mimscale.bench.engine.run_bench`'s (the trainer's engine, a synthetic batch of
the recipe's micro-batch); MFU = train FLOPs per image x images/s / the GPU's stated peak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mimscale.scaling.plan import Gpu


def calibrate(recipe_name: str, overrides: list[str], gpu: Gpu, steps: int = 5) -> dict[str, Any]:
    """Run ``steps`` engine steps of one global batch of ``train.micro_batch`` images per rank.

    Returns:
        ``{"images_per_s", "mfu", "peak_mem_gib" (CUDA only), "device", "summary"}``.
    """
    from mimscale.bench.engine import run_bench
    from mimscale.config.paths import recipe_path
    from mimscale.registry import load_recipe

    r = load_recipe(recipe_path(recipe_name), overrides)
    r.train.global_batch = r.train.micro_batch  # one micro-batch per step: no accumulation here
    out = run_bench(r, steps, warmup=2)
    flops = out.get("train_flops_per_image")
    if flops is None:
        from mimscale.scaling.memory import train_flops

        flops = train_flops(r)[0]
    mfu = flops * out["images_per_s"] / out["world_size"] / (gpu.tflops * 1e12)
    peak = out.get("peak_mem_gib")
    summary = f"{out['images_per_s']:.1f} img/s on {out['device']}" + (
        f", peak {peak:.1f} GiB" if peak else ""
    )
    return {"images_per_s": out["images_per_s"], "mfu": mfu, "peak_mem_gib": peak, "device": out["device"],
            "micro_batch": r.train.micro_batch, "summary": summary}  # fmt: skip
