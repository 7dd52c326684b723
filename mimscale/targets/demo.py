"""The digits demo with a precomputed teacher: write a small bank, then train from it.

``demo_bank`` is what ``mimscale demo --method cae_v2 --targets precomputed`` runs before training:
it precomputes K views per digit with the recipe's (tiny, random) teacher, prints the bank's size
and the step-time ratio of the precomputed teacher against the online one, and returns the
overrides that make the run read the bank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["bank_bytes", "demo_bank", "step_time_ratio"]


def bank_bytes(bank: str | Path) -> int:
    """Bytes of a bank on disk (target shards + manifest)."""
    return sum(p.stat().st_size for p in Path(bank).iterdir() if p.is_file())


def step_time_ratio(recipe: Any, bank: str, steps: int = 6) -> dict[str, float]:
    """Seconds of one forward + backward of the method on a real batch of the bank, with the online
    teacher and with the precomputed one, alternated (no optimizer: the teacher's share). The
    minimum over the steps: on a shared CPU the other processes only ever add time.

    Returns:
        ``{"online_s", "precomputed_s", "ratio", "teacher_s", "decode_s"}`` (ratio = precomputed /
        online; teacher / decode: the provider calls alone).
    """
    import dataclasses

    import torch

    from mimscale.data.pipeline import build_train_loader
    from mimscale.engine.setup import prepare_batch
    from mimscale.methods import build_method
    from mimscale.targets.provider import build_precomputed_provider
    from mimscale.teachers import build_provider

    cpu = torch.device("cpu")
    r = recipe
    loader = build_train_loader(
        r.data, r.mask, img_size=r.model.img_size, patch_size=r.model.patch_size,
        batch_size=r.train.micro_batch, seed=r.run.seed, rank=0, world_size=1, bank=bank,
    )  # fmt: skip
    batch = prepare_batch(next(iter(loader)), cpu, torch.float32)
    loader.close()
    method = build_method(r)
    pre_recipe = dataclasses.replace(
        r, teacher=dataclasses.replace(r.teacher, source="precomputed", bank=bank)
    )
    providers: dict[str, Any] = {
        "online": build_provider(r, cpu),
        "precomputed": build_precomputed_provider(pre_recipe, cpu),
    }
    times: dict[str, list[float]] = {k: [] for k in [*providers, "teacher", "decode"]}
    for i in range(steps + 1):
        for name, provider in providers.items():
            t0 = time.perf_counter()
            targets = provider(batch)
            t1 = time.perf_counter()
            method(batch, batch["mask"], targets).loss.backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
                times["teacher" if name == "online" else "decode"].append(t1 - t0)
    method.zero_grad(set_to_none=True)
    best = {k: min(v) for k, v in times.items()}
    out = {"online_s": best["online"], "precomputed_s": best["precomputed"]}
    return {**out, "ratio": out["precomputed_s"] / out["online_s"], "teacher_s": best["teacher"],
            "decode_s": best["decode"]}  # fmt: skip


def demo_bank(recipe_file: str | Path, overrides: list[str], out: Path, views: int = 2) -> list[str]:
    """Precompute the demo's bank (``out/bank``, fp16, ``views`` per digit; reused when complete),
    print its size and the step-time ratio, and return the overrides that train from it."""
    from mimscale.registry import load_recipe
    from mimscale.targets.precompute import precompute

    recipe = load_recipe(recipe_file, overrides)
    bank = out / "bank"
    t0 = time.perf_counter()
    manifest = precompute(recipe, bank, views=views, encoding="fp16", batch=64)
    assert manifest is not None  # one process writes every shard
    n = manifest["images"]["count"]
    size = bank_bytes(bank)
    print(
        f"[mimscale demo] teacher bank: {n} images x {views} views, fp16, {size / 2**20:.1f} MiB "
        f"({manifest['record_bytes']} B per view) in {bank} ({time.perf_counter() - t0:.0f} s)"
    )
    ratio = step_time_ratio(recipe, str(bank))
    print(
        f"[mimscale demo] forward+backward step: online teacher {ratio['online_s'] * 1e3:.1f} ms, "
        f"precomputed {ratio['precomputed_s'] * 1e3:.1f} ms (ratio {ratio['ratio']:.2f}; teacher forward "
        f"{ratio['teacher_s'] * 1e3:.1f} ms vs decode {ratio['decode_s'] * 1e3:.2f} ms)"
    )
    return ["teacher.source=precomputed", f"teacher.bank={bank}"]
