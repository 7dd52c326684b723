"""The demo's evidence: pre-trained vs the same encoder at random initialisation, plus curves.

After ``mimscale demo`` pre-trains (with the evaluation hook logging kNN and linear-probe
accuracy on the held-out digits during training), :func:`report` evaluates the *initial*
weights of the same run (the trainer seeds ``run.seed`` before building the method, so
rebuilding under that seed gives exactly the step-0 encoder) with the same protocol, prints a
small table, and writes ``demo_results.json`` and ``demo_curves.png`` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["initial_method", "method_name", "random_init_results", "readouts", "report"]


def method_name(recipe: Any) -> str:
    """The method as a reader should see it: its plug-ins named (``mae + mto``), not just ``mae``."""
    return " + ".join([recipe.method, *(["mto"] if recipe.mto.enabled else [])])


def initial_method(recipe: Any) -> Any:
    """The run's step-0 method: rebuilt under ``run.seed`` as the trainer builds it."""
    from mimscale.engine.loop import seed_everything
    from mimscale.methods import build_method

    with torch.random.fork_rng(devices=[]):
        seed_everything(recipe.run.seed)  # as Trainer.__init__ before build_method
        return build_method(recipe).eval()


def random_init_results(recipe: Any) -> dict[str, float]:
    """kNN / linear-probe accuracy of the run's step-0 (randomly initialised) encoder."""
    from mimscale.eval.hooks import evaluate

    return evaluate(initial_method(recipe), recipe, recipe.eval, torch.device("cpu"), progress=True)


def readouts(
    method: Any, recipe: Any, pools: tuple[str, ...] = ("mean", "cls")
) -> dict[str, dict[str, float]]:
    """kNN and linear-probe top-1 of ``method``'s frozen encoder for each readout (pool).

    Returns:
        ``{"mean": {"knn_top1", "linear_top1"}, "cls": {...}}``.
    """
    from dataclasses import replace

    from mimscale.eval.hooks import evaluate

    out = {}
    for pool in pools:
        res = evaluate(method, recipe, replace(recipe.eval, pool=pool), torch.device("cpu"), progress=True)
        out[pool] = {k: res[k] for k in ("knn_top1", "linear_top1")}
    return out


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _plot(recs: list[dict[str, Any]], rand: dict[str, float], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = [r for r in recs if "loss" in r]
    a1.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:gray")
    a1.set(xlabel="optimizer step", ylabel="pre-training loss", title=title)
    evals = [r for r in recs if "eval/knn_top1" in r]
    for key, color, name in (
        ("knn_top1", "tab:blue", "kNN (k=20)"),
        ("linear_top1", "tab:orange", "linear probe"),
    ):
        xs = [0] + [r["step"] for r in evals]
        a2.plot(xs, [rand[key]] + [r[f"eval/{key}"] for r in evals], marker="o", color=color, label=name)
        a2.axhline(rand[key], ls="--", lw=0.8, color=color)
    a2.set(xlabel="optimizer step (0 = random init, dashed)", ylabel="held-out top-1 (%)",
           title="evaluation on the held-out digits")  # fmt: skip
    a2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(
    recipe: Any, run_dir: str | Path, seconds: float | None = None, teacher: str | None = None
) -> dict[str, Any]:
    """Compare the trained encoder with its random initialisation; print, write JSON and PNG.

    Args:
        recipe: the demo's recipe (with the ``eval`` section on).
        run_dir: the finished run (its ``metrics.jsonl`` holds the hook's ``eval/*`` records).
        seconds: wall time (teacher training included when there was one), recorded in the JSON.
        teacher: what the teacher was (printed and recorded), None for methods without one.

    Returns:
        ``{"random_init": {...}, "pretrained": {...}, "steps", "png", ...}``.
    """
    run_dir = Path(run_dir)
    recs = _records(run_dir)
    evals = [r for r in recs if "eval/knn_top1" in r]
    if not evals:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no eval records (is eval.at_end on?)")
    last = evals[-1]
    trained = {k: last[f"eval/{k}"] for k in ("knn_top1", "linear_top1")}
    rand = random_init_results(recipe)
    png = run_dir / "demo_curves.png"
    name = method_name(recipe)
    _plot(recs, rand, png, f"{name} on digits ({recipe.model.embed_dim}-d, depth {recipe.model.depth})")
    res = {
        "method": name,
        "steps": last["step"],
        "pretrain_seconds": seconds,
        "pool": recipe.eval.pool,
        "teacher": teacher,
        "random_init": {k: rand[k] for k in trained},
        "pretrained": trained,
        "num_train": rand["num_train"],
        "num_val": rand["num_val"],
        "png": str(png),
    }
    (run_dir / "demo_results.json").write_text(json.dumps(res, indent=2) + "\n")
    n = int(rand["num_val"])
    print(f"\n[mimscale demo] held-out digits ({n} images, 10 classes), frozen {res['pool']} features:")
    print(f"  {'encoder':<36} {'kNN top-1':>10} {'linear top-1':>13}")
    row = "random init (same weights, step 0)"
    print(f"  {row:<36} {rand['knn_top1']:>9.1f}% {rand['linear_top1']:>12.1f}%")
    row = f"pre-trained ({name}, {last['step']} steps)"
    print(f"  {row:<36} {trained['knn_top1']:>9.1f}% {trained['linear_top1']:>12.1f}%")
    if teacher:
        print(f"  teacher: {teacher}")
    print(f"[mimscale demo] curves: {png}")
    pictures = sorted((run_dir / "images").glob("recon_step*.png"))
    if pictures:
        print(f"[mimscale demo] reconstructions: {pictures[-1]} (and {len(pictures) - 1} earlier)")
    from mimscale.engine.logger import publish_pngs

    if publish_pngs(run_dir, {"demo/curves": png}, f"{name} demo"):  # when the run logs to wandb
        print("[mimscale demo] curves sent to the run's wandb run")
    return res
