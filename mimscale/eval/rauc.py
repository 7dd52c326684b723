"""RAUC: the relative area under two evaluation curves (MTO, docs/methods.md §5.7, Eq. 6).

    RAUC(S1, S2; E1, E2) = int_{E1}^{E2} (S2(E) - S1(E1)) dE / int_{E1}^{E2} (S1(E) - S1(E1)) dE

S1 is the baseline's accuracy curve, S2 the compared run's; both are integrated with the
trapezoid rule over the union of their evaluation points in [E1, E2], each curve linearly
interpolated there (docs/methods.md: "trapezoid rule over the evaluated epochs" [I]). Identical
curves give 1; a curve that learns faster gives > 1.

``mimscale diagnose rauc RUN_A RUN_B --key eval/linear_top1 [--x epoch] --out DIR`` reads the
``eval/*`` records of the two runs' ``metrics.jsonl`` (RUN_A is the baseline), writes
``DIR/rauc.json`` and ``DIR/rauc.png``, and sends the plot as ``diagnostics/rauc`` to the wandb
run of both runs (``--wandb-run RUN`` names the one run to send it to); a run whose saved
recipe does not log to wandb gets nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main", "overlap", "rauc", "read_curve"]

MIN_OVERLAP = 0.5  # below this share of the longer curve's span, RAUC compares too little to mean much


def rauc(
    e1_points: Sequence[float],
    s1: Sequence[float],
    e2_points: Sequence[float],
    s2: Sequence[float],
    e_start: float | None = None,
    e_end: float | None = None,
) -> float:
    """Eq. 6 of MTO on two sampled curves.

    Args:
        e1_points: evaluation points (epochs, steps, ...) of the baseline curve, ascending.
        s1: baseline accuracies at ``e1_points``.
        e2_points: evaluation points of the compared curve, ascending.
        s2: its accuracies.
        e_start: E1 (default: the first point both curves cover).
        e_end: E2 (default: the last point both curves cover).

    Returns:
        RAUC(S1, S2; E1, E2).

    Raises:
        ValueError: empty range or a flat baseline (zero denominator).
    """
    x1, y1, x2, y2 = (np.asarray(v, dtype=np.float64) for v in (e1_points, s1, e2_points, s2))
    lo = max(x1[0], x2[0]) if e_start is None else e_start
    hi = min(x1[-1], x2[-1]) if e_end is None else e_end
    if not hi > lo:
        raise ValueError(f"RAUC: empty range [{lo}, {hi}]")
    grid = np.union1d(np.concatenate([x1, x2]), [lo, hi])
    grid = grid[(grid >= lo) & (grid <= hi)]
    base = np.interp(lo, x1, y1)  # S1(E1)
    num = np.trapezoid(np.interp(grid, x2, y2) - base, grid)
    den = np.trapezoid(np.interp(grid, x1, y1) - base, grid)
    if abs(den) < 1e-12:
        raise ValueError("RAUC: the baseline curve is flat over [E1, E2] (zero denominator)")
    return float(num / den)


def overlap(e1_points: Sequence[float], e2_points: Sequence[float]) -> float:
    """The shared span of two curves' evaluation points over the longer curve's span, in [0, 1]."""
    lo, hi = max(e1_points[0], e2_points[0]), min(e1_points[-1], e2_points[-1])
    longest = max(e1_points[-1] - e1_points[0], e2_points[-1] - e2_points[0])
    return max(0.0, hi - lo) / longest if longest > 0 else 0.0


def read_curve(run_dir: str | Path, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """``(x values, key values)`` of the records of ``run_dir/metrics.jsonl`` that have ``key``.

    Args:
        run_dir: a run directory (or the metrics.jsonl itself).
        key: e.g. ``eval/linear_top1``.
        x: ``step``, ``samples`` or ``epoch`` (samples / the run's samples per epoch).
    """
    path = Path(run_dir)
    path = path if path.is_file() else path / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    per_epoch = None
    if x == "epoch":
        metas = [r for r in recs if "derived" in r]  # the logger's first record, when present
        per_epoch = metas[0]["derived"]["samples_per_epoch"] if metas else None
    pts = sorted((r["samples" if x != "step" else "step"], r[key]) for r in recs if key in r)
    if not pts:
        raise ValueError(f"{path}: no record has {key!r}")
    xs = [p[0] / per_epoch if per_epoch else p[0] for p in pts]
    return xs, [p[1] for p in pts]


def _plot(c1, c2, names, key: str, value: float, out: Path, x: str = "step") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (xs, ys), name in zip((c1, c2), names, strict=True):
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xlabel=x, ylabel=key, title=f"RAUC({names[0]}, {names[1]}) = {value:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``mimscale diagnose rauc RUN_A RUN_B --key KEY [--x step] [--e1 --e2] --out DIR``."""
    p = argparse.ArgumentParser(prog="mimscale diagnose rauc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("baseline", help="run dir (S1)")
    p.add_argument("compared", help="run dir (S2)")
    p.add_argument("--key", default="eval/linear_top1")
    p.add_argument("--x", choices=["step", "samples", "epoch"], default="step")
    p.add_argument("--e1", type=float, default=None)
    p.add_argument("--e2", type=float, default=None)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--wandb-run", default=None, metavar="RUN",
        help="send the plot to this run's wandb run only (RUN_A or RUN_B); default: to both runs' "
        "wandb runs (a run whose recipe has wandb off gets nothing)",
    )  # fmt: skip
    args = p.parse_args(argv)
    targets = [Path(args.baseline), Path(args.compared)]
    if args.wandb_run is not None:
        named = [t for t in targets if t.resolve() == Path(args.wandb_run).resolve()]
        if not named:
            print(f"error: --wandb-run {args.wandb_run} is neither of the two runs", file=sys.stderr)
            return 2
        targets = named[:1]
    c1, c2 = read_curve(args.baseline, args.key, args.x), read_curve(args.compared, args.key, args.x)
    value = rauc(*c1, *c2, args.e1, args.e2)
    shared = overlap(c1[0], c2[0])
    if shared < MIN_OVERLAP:
        msg = (f"warning: the two curves share only {100 * shared:.0f}% of their {args.x} range; RAUC "
               "compares a short stretch (evaluate both runs over the same steps)")  # fmt: skip
        print(msg, file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"rauc": value, "key": args.key, "x": args.x, "baseline": args.baseline, "compared": args.compared,
           "overlap": shared, "baseline_curve": c1, "compared_curve": c2}  # fmt: skip
    (out / "rauc.json").write_text(json.dumps(res, indent=2) + "\n")
    names = [Path(args.baseline).name, Path(args.compared).name]
    _plot(c1, c2, names, args.key, value, out / "rauc.png", args.x)
    print(json.dumps({"rauc": value, "out": str(out)}))
    _publish(targets, out / "rauc.png", f"RAUC({names[0]}, {names[1]}) on {args.key} = {value:.3f}")
    return 0


def _publish(run_dirs: list[Path], png: Path, caption: str) -> None:
    """The plot to each run's wandb run (when its saved recipe logs to wandb), saying where."""
    from mimscale.engine.logger import publish_pngs

    for run_dir in run_dirs:
        if publish_pngs(run_dir, {"diagnostics/rauc": png}, caption):
            print(f"[mimscale] rauc: plot sent to the wandb run of {run_dir}", file=sys.stderr)
