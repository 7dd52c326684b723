"""``mimscale demo --seeds 0,1,2``: the demo once per seed, and the spread of its gains.

A gain measured at one seed can be seed noise: the random init itself reads differently from seed
to seed. This runs the same demo (method, settings, overrides) once per ``run.seed``, each in its
own run directory (``OUT/<method>_seed<N>``), reads each run's ``demo_results.json`` (the
pre-trained encoder and *its own* step-0 encoder, :mod:`mimscale.demo.report`) and prints the gain
per seed, its mean and sample standard deviation, and the smallest gain; ``demo_seeds.json`` in
``OUT`` keeps the numbers.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["parse_seeds", "run_seeds", "summarise"]

READOUTS = (("knn_top1", "kNN"), ("linear_top1", "linear"))


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a clear ValueError for anything else."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected integers separated by commas, got {text!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected at least two different seeds, got {text!r}")
    return seeds


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-readout gains (points) of several seeds' ``demo_results.json``: each, mean, std, min.

    Args:
        results: one ``demo_results.json`` mapping per seed, with ``seed`` added.

    Returns:
        ``{"seeds": [...], "knn_top1": {"gains", "mean", "std", "min"}, "linear_top1": {...}}``;
        ``std`` is the sample standard deviation (n - 1).
    """
    out: dict[str, Any] = {"seeds": [r["seed"] for r in results]}
    for key, _ in READOUTS:
        gains = [r["pretrained"][key] - r["random_init"][key] for r in results]
        out[key] = {"gains": gains, "mean": statistics.mean(gains), "std": statistics.stdev(gains),
                    "min": min(gains)}  # fmt: skip
    return out


def run_seeds(
    seeds: list[int], method: str, out: Path, overrides: list[str] | None = None, teacher: str = "trained"
) -> int:
    """Run the demo of ``method`` once per seed; print the gains' spread; exit code."""
    from mimscale.demo.run import run_demo

    results: list[dict[str, Any]] = []
    for seed in seeds:
        name = f"{method}_seed{seed}"
        print(f"\n[mimscale demo] seed {seed} ({len(results) + 1} of {len(seeds)}): {out / name}", flush=True)
        over = [*(overrides or []), f"run.seed={seed}", f"run.name={name}"]
        code = run_demo(method, out, over, teacher, seeds_hint=False)  # type: ignore[arg-type]
        if code:
            return code
        res = json.loads((out / name / "demo_results.json").read_text())
        results.append({**res, "seed": seed, "run_dir": str(out / name)})
    summary = summarise(results)
    (out / "demo_seeds.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1) + "\n")
    steps = results[0]["steps"]
    print(f"\n[mimscale demo] {results[0]['method']}, {steps} steps, {len(seeds)} seeds: held-out top-1, "
          f"pre-trained (its own random init) and the gain in points")  # fmt: skip
    print(f"  {'seed':<6}" + "".join(f"{name + ' top-1':>22}{'gain':>8}" for _, name in READOUTS))
    for i, r in enumerate(results):  # each gain as summarise computed it
        trained, init = r["pretrained"], r["random_init"]
        cells = "".join(
            f"{trained[k]:>13.1f} ({init[k]:>5.1f}){summary[k]['gains'][i]:>+8.1f}" for k, _ in READOUTS
        )
        print(f"  {r['seed']:<6}{cells}")
    for key, name in READOUTS:
        s = summary[key]
        print(f"  {name} gain: {s['mean']:+.1f} +- {s['std']:.1f} points (mean +- sample std), "
              f"smallest {s['min']:+.1f}")  # fmt: skip
    print(f"[mimscale demo] numbers: {out / 'demo_seeds.json'}")
    return 0
