"""``mimscale bench engine ... --profile DIR``: where an engine step's time goes, per ZeRO stage.

For each engine: the median of synchronised phase timings over a few steps (``prepare`` the
batch copy and normalisation, ``forward``, ``backward``, ``step``: DeepSpeed's optimizer step with
its gradient reduction and, at ZeRO-0, the fused AdamW), written to ``DIR/phases.json``; then one
whole step under ``torch.profiler`` (CPU, and CUDA on a GPU), its operator table sorted by self
time written to ``DIR/profile_zero{stage}.txt`` and its trace to ``DIR/trace_zero{stage}.json``.
A host-bound step shows as CPU self time well above the CUDA total; a per-parameter loop as
thousands of small ops in ``step``.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mimscale.bench.common import sync

PHASES = ("prepare", "forward", "backward", "step")


def phase_times(
    engine, micro: list[dict[str, Any]], device: torch.device, dtype: torch.dtype, steps: int = 3
) -> dict[str, float]:
    """Median seconds per step of each of :data:`PHASES` (summed over the micro-batches)."""
    from mimscale.engine.loop import prepare_batch

    per: dict[str, list[float]] = {k: [] for k in PHASES}
    for _ in range(steps):
        spent = dict.fromkeys(PHASES, 0.0)
        for batch in micro:
            sync(device)
            t0 = time.perf_counter()
            b = prepare_batch(batch, device, dtype)
            sync(device)
            t1 = time.perf_counter()
            loss = engine(b, b.get("mask"), None).loss
            sync(device)
            t2 = time.perf_counter()
            engine.backward(loss)
            sync(device)
            t3 = time.perf_counter()
            engine.step()
            sync(device)
            t4 = time.perf_counter()
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                spent[k] += dt
        for k in PHASES:
            per[k].append(spent[k])
    return {k: statistics.median(v) for k, v in per.items()}


def profile_engines(
    engines: dict[int, Any], micro: list[dict[str, Any]], device: torch.device, dtype: torch.dtype, out: str
) -> dict[int, dict[str, float]]:
    """Phase timings of every engine (returned, and written with the profiler tables to ``out``)."""
    from torch.profiler import ProfilerActivity, profile

    from mimscale.engine.loop import train_step

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    phases = {stage: phase_times(engine, micro, device, dtype) for stage, engine in engines.items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for stage, engine in engines.items():
        step = functools.partial(train_step, engine, micro, device, dtype)
        with profile(activities=activities) as prof:
            step()
            sync(device)
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (folder / f"profile_zero{stage}.txt").write_text(table + "\n")
        prof.export_chrome_trace(str(folder / f"trace_zero{stage}.json"))
        phases[stage]["ops"] = float(sum(e.count for e in prof.key_averages()))
    (folder / "phases.json").write_text(json.dumps({str(k): v for k, v in phases.items()}, indent=2) + "\n")
    return phases
