"""``mimscale sweep report DIR``: one table (markdown + CSV) and one PNG of a sweep directory.

Each finished point's readouts are the last ``eval/<readout>`` values in its ``metrics.jsonl``;
its training compute is the plan's FLOPs per image times the images the run consumed (its last
logged step x the global batch) and the planned GPU-hours scaled the same way. The PNG plots the
first readout against training FLOPs (log axis), one curve per method, each point labelled with
its model size. Published results for the same readout (:data:`REFERENCES`, e.g. MAE's ViT-B/L/H
ImageNet fine-tuning top-1) are overlaid as hollow stars labelled "paper", their compute counted as
the points' is (the plan's FLOPs per image of the recipe they name x images x epochs). When the
first finished point's recipe logs to wandb, the plot and the table go to a wandb run of the sweep
directory's own (``DIR/wandb_id``), under ``sweep/report`` and ``sweep/table``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from mimscale.config import RecipeError

SIZE_AXES = ("size", "model")  # axis names whose label is printed on the points
# The paper reference table: method, size, recipe (the shipped recipe of that model), epochs,
# images_per_epoch, readout (the eval hook's name: top1 = fine-tuning top-1), value (%), source.
REFERENCES = Path(__file__).with_name("references.csv")


def last_values(metrics: Path, keys: list[str]) -> tuple[dict[str, float], int]:
    """The last logged value of each ``eval/<key>`` and the last step of the run."""
    vals: dict[str, float] = {}
    step = 0
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        step = max(step, int(rec.get("step", 0)))
        for k in keys:
            if f"eval/{k}" in rec:
                vals[k] = float(rec[f"eval/{k}"])
    return vals, step


def rows_of(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per point (finished or not) and the readout names."""
    meta_file = sweep_dir / "sweep.json"
    if not meta_file.is_file():
        raise RecipeError(f"{sweep_dir}: not a sweep directory (no sweep.json)")
    meta = json.loads(meta_file.read_text())
    readouts = list(meta["readouts"])
    rows = []
    for p in meta["points"]:
        run = sweep_dir / p["name"]
        plan = p["plan"]
        row: dict[str, Any] = {"point": p["name"], "method": plan["method"], **p["labels"],
                               "params_m": plan["params"] / 1e6, "status": "todo"}  # fmt: skip
        if (run / "sweep_failed.txt").is_file():
            row["status"] = "failed"
        if (run / "sweep_done.json").is_file() and (run / "metrics.jsonl").is_file():
            from mimscale.registry import load_recipe

            vals, step = last_values(run / "metrics.jsonl", readouts)
            gb = load_recipe(run / "recipe.yaml").train.global_batch
            images = step * gb
            done = json.loads((run / "sweep_done.json").read_text())
            row.update(status="done", steps=step, images=images,
                       training_flops=plan["train_flops_per_image"] * images,
                       gpu_hours=plan["gpu_hours"] * images / max(plan["images"], 1),
                       seconds=done["seconds"], **vals)  # fmt: skip
        rows.append(row)
    return rows, readouts


def size_label(row: dict[str, Any]) -> str:
    for axis in SIZE_AXES:
        if axis in row:
            return str(row[axis])
    return f"{row['params_m']:.2f}M"


def write_tables(rows: list[dict[str, Any]], readouts: list[str], sweep_dir: Path) -> tuple[Path, Path]:
    cols = [
        "point",
        "method",
        "params_m",
        "status",
        "steps",
        "training_flops",
        "gpu_hours",
        "seconds",
        *readouts,
    ]
    fmt = {"params_m": "{:.3f}", "training_flops": "{:.3e}", "gpu_hours": "{:.3g}", "seconds": "{:.0f}"}
    cell = lambda r, c: (
        "" if r.get(c) is None else fmt.get(c, "{:.2f}" if isinstance(r[c], float) else "{}").format(r[c])
    )
    csv_path, md_path = sweep_dir / "sweep_report.csv", sweep_dir / "sweep_report.md"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([[cell(r, c) for c in cols] for r in rows])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def reference_points(readout: str, table: Path = REFERENCES) -> list[dict[str, Any]]:
    """The table's published results for ``readout``, each with its ``training_flops``: the plan's
    FLOPs per image of the named recipe x ``images_per_epoch`` x ``epochs``."""
    from mimscale.config.paths import recipe_path
    from mimscale.registry import load_recipe
    from mimscale.scaling.memory import train_flops

    out = []
    with table.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["readout"] != readout:
                continue
            per_image, _ = train_flops(load_recipe(recipe_path(row["recipe"])))
            images = int(row["images_per_epoch"]) * int(row["epochs"])
            out.append({**row, "value": float(row["value"]), "training_flops": per_image * images})
    return out


def plot(rows: list[dict[str, Any]], readout: str, png: Path) -> list[dict[str, Any]]:
    """Readout vs training FLOPs (log), one curve per method, points labelled with the size, and
    the paper reference points for the same readout; returns those references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["status"] == "done" and readout in r]
    for i, method in enumerate(sorted({r["method"] for r in done})):
        pts = sorted((r for r in done if r["method"] == method), key=lambda r: r["training_flops"])
        xs, ys = [r["training_flops"] for r in pts], [r[readout] for r in pts]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=method)
        for r, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(size_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    refs = reference_points(readout)
    for method in sorted({r["method"] for r in refs}):
        pts = sorted((r for r in refs if r["method"] == method), key=lambda r: r["training_flops"])
        xs, ys = [r["training_flops"] for r in pts], [r["value"] for r in pts]
        ax.plot(xs, ys, marker="*", markersize=10, markerfacecolor="none", linestyle=":", color="0.4",
                label=f"{method}, paper: {pts[0]['source'].split(':')[0]}")  # fmt: skip
        for r, x, y in zip(pts, xs, ys, strict=True):
            label = f"{r['size']} (paper)"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="training compute (FLOPs, log)", ylabel=f"{readout} (%)")
    # a figure title, left: the top axis (GPU-hours) takes the axes' title row
    fig.suptitle(f"{readout} vs training compute", fontsize=10, x=0.02, ha="left")
    if done:
        gh = [r["gpu_hours"] / r["training_flops"] for r in done if r["training_flops"]]
        if gh:  # GPU-hours are proportional to FLOPs at the planned MFU: a second axis says it
            k = gh[0]
            sec = ax.secondary_xaxis("top", functions=(lambda x: x * k, lambda h: h / k))
            sec.set_xlabel("planned GPU-hours")
    if done or refs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return refs


def publish(sweep_dir: Path, rows: list[dict[str, Any]], png: Path, csv_path: Path) -> bool:
    """The plot and the table to the sweep's own wandb run, when the first finished point's saved
    recipe logs to wandb (its project, entity and mode); returns whether anything was sent."""
    import yaml

    from mimscale.config import WandbConfig
    from mimscale.config.typed import build_section
    from mimscale.engine.logger import open_wandb, wandb_on

    first = next((r for r in rows if r["status"] == "done"), None)
    if first is None:
        return False
    saved = sweep_dir / first["point"] / "recipe.yaml"
    w = build_section(WandbConfig, (yaml.safe_load(saved.read_text()) or {}).get("wandb"), f"{saved}: wandb")
    if not wandb_on(w):
        return False
    import wandb

    with csv_path.open(newline="") as f:
        header, *data = list(csv.reader(f))
    run = open_wandb(w, sweep_dir, f"sweep {sweep_dir.name}")
    table = wandb.Table(columns=list[str | int](header), data=data)
    run.log({"sweep/report": wandb.Image(str(png)), "sweep/table": table})
    run.finish()
    return True


def report(sweep_dir: Path) -> dict[str, Any]:
    """Write the table and the plot; return the rows (JSON-able)."""
    rows, readouts = rows_of(sweep_dir)
    md, csv_path = write_tables(rows, readouts, sweep_dir)
    png = sweep_dir / "sweep_report.png"
    refs = plot(rows, readouts[0], png)
    sent = publish(sweep_dir, rows, png, csv_path)
    return {"rows": rows, "markdown": str(md), "csv": str(csv_path), "png": str(png), "references": refs,
            "wandb": sent}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: mimscale sweep report DIR", file=sys.stderr)
        return 2
    out = report(Path(argv[0]))
    print(Path(out["markdown"]).read_text())
    refs = f" (with {len(out['references'])} paper reference points)" if out["references"] else ""
    print(f"[sweep] table: {out['markdown']}, {out['csv']}; plot: {out['png']}{refs}")
    if out["wandb"]:
        print(f"[sweep] plot and table sent to the wandb run of {argv[0]}")
    return 0
