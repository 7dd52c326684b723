"""``mimscale demo --compare mae,cae_v2,...``: the methods side by side, like for like.

Every method pre-trains the same student (the ``cpu_tiny`` ViT) for the same number of steps with
the same batch, through :func:`mimscale.demo.run.prepare` (teacher methods get the supervised
digits teacher unless ``--teacher random``); ``key=value`` overrides apply to all of them. After
each run, its final encoder (loaded back from the checkpoint, as ``mimscale eval`` does) and the
same encoder at random initialisation are read out four ways: kNN and linear probe, on
mean-pooled patch tokens and on the [CLS] token. One table, ``compare_results.json`` and one PNG
(``compare_curves.png``: every method's held-out curves during pre-training) summarise it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_COMPARE", "run_compare"]

DEFAULT_COMPARE = "mae,cae_v2,mr_mae,lc_mae,mae_mto"
KEYS = (("mean", "knn_top1"), ("mean", "linear_top1"), ("cls", "knn_top1"), ("cls", "linear_top1"))


def _one(name: str, out: Path, overrides: list[str], teacher: str) -> dict[str, Any]:
    """Pre-train one method, then read out its final and its initial encoder."""
    from mimscale.demo.report import initial_method, readouts
    from mimscale.demo.run import describe, prepare
    from mimscale.engine.loop import train
    from mimscale.eval.runs import load_method

    recipe, info = prepare(name, out, overrides, teacher)  # type: ignore[arg-type]
    print(f"[mimscale demo] {name}: {describe(recipe)}", flush=True)
    t0 = time.perf_counter()
    run_dir = train(recipe)
    seconds = time.perf_counter() - t0
    method, _ = load_method(run_dir)
    curves = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/knn_top1" in x
    ]
    return {
        "method": name, "run_dir": str(run_dir), "seconds": seconds, "teacher": info["teacher"],
        "settings": describe(recipe), "steps": curves[-1]["step"] if curves else None,
        "trained": readouts(method, recipe), "random_init": readouts(initial_method(recipe), recipe),
        "curves": [{"step": r["step"], "knn_top1": r["eval/knn_top1"], "linear_top1": r["eval/linear_top1"]}
                   for r in curves],
    }  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """The comparison table: each readout as trained (its own random init)."""
    head = f"  {'method':<22}{'steps':>6}{'time':>7}" + "".join(
        f"{p + ' ' + k.split('_')[0]:>17}" for p, k in KEYS
    )
    lines = [head]
    for r in rows:
        cells = "".join(f"{r['trained'][p][k]:>8.1f} ({r['random_init'][p][k]:>5.1f})" for p, k in KEYS)
        lines.append(f"  {r['method']:<22}{r['steps'] or 0:>6}{r['seconds']:>6.0f}s{cells}")
    return lines


def _plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("knn_top1", "linear_top1"), ("kNN (k=20)", "linear probe"), strict=True):
        for i, r in enumerate(rows):
            color = f"C{i}"
            xs = [0] + [c["step"] for c in r["curves"]]
            ys = [r["random_init"]["mean"][key]] + [c[key] for c in r["curves"]]
            ax.plot(xs, ys, marker="o", ms=3, color=color, label=r["method"])
        ax.set(xlabel="optimizer step (0 = random init)", ylabel="held-out top-1 (%)",
               title=f"{title}, mean-pooled tokens")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_compare(
    methods: str = DEFAULT_COMPARE, out: Path = Path("runs/demo"), overrides: list[str] | None = None,
    teacher: str = "trained",
) -> int:  # fmt: skip
    """Run ``methods`` (comma list) like for like; print the table, write JSON + PNG; exit code."""
    from mimscale.demo.run import demo_recipes

    names = [m.strip() for m in methods.split(",") if m.strip()]
    known = demo_recipes()
    bad = [m for m in names if m not in known]
    if bad or not names:
        print(f"demo: no CPU demo for {', '.join(bad) or 'an empty list'} (have: {', '.join(known)})")
        return 2
    print(f"[mimscale demo] comparing {', '.join(names)}: the same student, steps, batch and readouts. "
          f"This runs {len(names)} pre-trainings (plus the teacher for CAE v2 / MR-MAE) and takes about "
          f"{3 * len(names)}-{5 * len(names)} minutes on 2 CPU cores.", flush=True)  # fmt: skip
    rows = []
    for name in names:
        rows.append(_one(name, out, list(overrides or []), teacher))
    png = out / "compare_curves.png"
    _plot(rows, png)
    (out / "compare_results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n[mimscale demo] held-out digits, frozen encoder: pre-trained (its own random init), top-1 %")
    print("\n".join(_table(rows)))
    for r in rows:
        print(f"  {r['method']}: {r['settings']}")
    print(f"[mimscale demo] curves: {png}; numbers: {out / 'compare_results.json'}")
    return 0
