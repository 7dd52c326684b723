"""``mimscale sweep SPEC.yaml [--launcher local|nproc|slurm] [--dry-run]`` and ``sweep report DIR``.

A spec names the axes of a grid; every point is an ordinary run directory (``out_dir/<point>``,
resumable as any run). A finished point (``sweep_done.json`` beside its ``metrics.jsonl``) is
skipped; a failed one is reported and retried on the next call. Everything is checked before the
first launch: unknown spec keys, axis values a recipe refuses, points whose plan does not fit the
stated GPUs, a sweep directory written by another spec. Spec keys::

    name: digits                  # the sweep's name
    out_dir: runs/sweeps/digits   # one run directory per point, plus sweep.json
    recipe: mae/cpu_tiny          # the base recipe (an axis named `recipe` replaces it per point)
    overrides: [train.epochs=2]   # applied to every point
    axes:                         # the grid is their product, in this order
      recipe: [mae/cpu_tiny, cae_v2/cpu_tiny]
      size:                       # a named axis: each value is a label and its overrides
        - {label: w64d2, model.embed_dim: 64, model.depth: 2}
      train.epochs: [1, 2]        # any recipe key: one override per value
    readouts: [knn_top1, linear_top1]   # eval/<name> read from each run's metrics.jsonl
    gpus: 8                       # the planned cost per point (mimscale plan) on these GPUs
    gpu: H100                     # or gpu_mem: GiB and gpu_tflops: T (and mfu:)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimscale.config import RecipeError

KEYS = {"name", "out_dir", "recipe", "overrides", "axes", "readouts", "gpus", "nodes", "gpu", "gpu_mem",
        "gpu_tflops", "mfu", "teacher_overrides"}  # fmt: skip
READOUTS = {"knn_top1", "linear_top1", "top1"}
DONE, FAILED, SPEC = "sweep_done.json", "sweep_failed.txt", "sweep.json"


@dataclass
class Point:
    """One run of the grid: its name (the run directory's), recipe, overrides and axis labels."""

    name: str
    recipe: str
    overrides: list[str]
    labels: dict[str, str]
    plan: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def read_spec(path: Path) -> dict[str, Any]:
    """The spec, its keys checked (one line naming the file and the key)."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read the sweep spec ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise RecipeError(f"{path}: a sweep spec is a mapping of keys")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown sweep key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    for key in ("name", "out_dir", "axes"):
        if key not in spec:
            raise RecipeError(f"{path}: the sweep key {key!r} is required")
    if not isinstance(spec["axes"], dict) or not all(
        isinstance(v, list) and v for v in spec["axes"].values()
    ):
        raise RecipeError(f"{path}: axes: each axis is a non-empty list of values")
    bad = sorted(set(spec.get("readouts", [])) - READOUTS)
    if bad:
        raise RecipeError(
            f"{path}: readouts: unknown readout {bad[0]!r} (known: {', '.join(sorted(READOUTS))})"
        )
    return spec


def points(spec: dict[str, Any], path: Path) -> list[Point]:
    """The grid's points in axis order (no recipe loaded yet)."""
    choices = []
    for axis, values in spec["axes"].items():
        row: list[tuple[str, None, list[str]]] = []
        for v in values:
            if axis == "recipe":
                row.append((str(v), None, []))
            elif isinstance(v, dict):
                if "label" not in v:
                    raise RecipeError(f"{path}: axes.{axis}: a mapping value needs a 'label' key")
                over = [f"{k}={_value(x)}" for k, x in v.items() if k != "label"]
                row.append((str(v["label"]), None, over))
            else:
                row.append((_value(v), None, [f"{axis}={_value(v)}"]))
        choices.append([(axis, *c) for c in row])
    out = []
    for combo in itertools.product(*choices):
        recipe = spec.get("recipe", "")
        labels, over = {}, list(spec.get("overrides", []))
        for axis, label, _, extra in combo:
            labels[axis] = label
            if axis == "recipe":
                recipe = label
            over += extra
        if not recipe:
            raise RecipeError(f"{path}: recipe: no base recipe and no 'recipe' axis")
        name = "__".join(_slug(f"{a}={label}" if a != "recipe" else label) for a, label in labels.items())
        out.append(Point(name, recipe, over, labels))
    return out


def point_overrides(spec: dict[str, Any], p: Point) -> list[str]:
    """Everything the point's run gets: the spec's, the axes', the teacher's, its run directory."""
    from mimscale.config.paths import recipe_path
    from mimscale.registry import METHODS, load_recipe

    extra = [f"run.out_dir={spec['out_dir']}", f"run.name={p.name}"]
    teacher = list(spec.get("teacher_overrides", []))
    if teacher:  # only methods with a teacher take the teacher's keys
        method = load_recipe(recipe_path(p.recipe), [*p.overrides, *extra]).method
        teacher = teacher if METHODS[method].needs_teacher else []
    return [*p.overrides, *teacher, *extra]


def check_points(spec: dict[str, Any], pts: list[Point], path: Path) -> None:
    """Load every point's recipe and plan it on the stated GPUs; raise naming the first bad one."""
    from mimscale.config.paths import recipe_path
    from mimscale.registry import load_recipe
    from mimscale.scaling import memory
    from mimscale.scaling.plan import images_per_epoch

    gpu = _gpu(spec, path)
    world = int(spec.get("gpus", 1)) * int(spec.get("nodes", 1))
    for p in pts:
        try:
            r = load_recipe(recipe_path(p.recipe), point_overrides(spec, p))
        except RecipeError as e:
            raise RecipeError(f"{path}: point {p.name}: {e}") from None
        method = memory.shaped_method(r)
        c = memory.count_params(r, method)
        t = r.train
        mem = memory.estimate(r, c, t.zero_stage, world, t.micro_batch, t.activation_checkpointing, True)
        usable = gpu.mem_gib * 0.92 - 1.5
        if mem.total / 2**30 > usable:
            raise RecipeError(
                f"{path}: point {p.name} does not fit {world} x {gpu.name}: it needs "
                f"{mem.total / 2**30:.1f} GiB per GPU, {usable:.1f} GiB usable (see `mimscale plan`)"
            )
        flops = memory.train_flops(r, method)[0]
        images = min(t.epochs * images_per_epoch(r)[0], (t.max_steps or 1 << 60) * t.global_batch)
        hours = images * flops / (gpu.tflops * 1e12 * gpu.mfu) / 3600
        p.plan = {"method": r.method + ("+mto" if r.mto.enabled else ""), "params": c.trainable,
                  "train_flops_per_image": flops, "images": images, "training_flops": flops * images,
                  "gpu_hours": hours, "memory_gib": mem.total / 2**30}  # fmt: skip


def _gpu(spec: dict[str, Any], path: Path) -> Any:
    from mimscale.scaling.plan import gpu_from_args

    ns = argparse.Namespace(gpu=spec.get("gpu", "H100"), gpu_mem=spec.get("gpu_mem"),
                            gpu_tflops=spec.get("gpu_tflops"), mfu=spec.get("mfu"))  # fmt: skip
    try:
        return gpu_from_args(ns)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def claim_dir(spec: dict[str, Any], path: Path, pts: list[Point]) -> Path:
    """``out_dir`` for this spec: a directory written by another spec (another hash) is refused."""
    out = Path(spec["out_dir"])
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    meta = out / SPEC
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("spec_sha256") != digest:
            raise RecipeError(
                f"{path}: out_dir {out} holds the sweep {old.get('name')!r} of another spec "
                f"({old.get('spec_file')}); use another out_dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "name": spec["name"], "spec_file": str(path), "spec_sha256": digest, "spec": spec,
        "readouts": spec.get("readouts", ["knn_top1", "linear_top1"]),
        "points": [{"name": p.name, "recipe": p.recipe, "labels": p.labels, "plan": p.plan} for p in pts],
    }  # fmt: skip
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(meta)
    return out


def launch_point(spec: dict[str, Any], p: Point, launcher: str, nproc: int) -> int:
    """Train one point in a child process (its own process group and DeepSpeed world)."""
    cmd = [sys.executable, "-m", "mimscale.cli", "train", p.recipe, *point_overrides(spec, p)]
    if launcher == "nproc":
        cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd).returncode


def slurm_line(spec_path: Path, spec: dict[str, Any], n: int) -> str:
    """One job array: task i runs point i through ``mimscale sweep SPEC --point i``."""
    gpus, nodes = int(spec.get("gpus", 1)), int(spec.get("nodes", 1))
    return (
        f"sbatch --array=0-{n - 1} --nodes {nodes} --gpus-per-node {gpus} --job-name {spec['name']} "
        f"--wrap {shlex.quote(f'mimscale sweep {spec_path} --launcher nproc --point $SLURM_ARRAY_TASK_ID')}"
    )


def run_sweep(path: Path, launcher: str = "local", dry_run: bool = False, point: int | None = None) -> int:
    """Check every point, then run the unfinished ones (or print the plan with ``dry_run``)."""
    spec = read_spec(path)
    pts = points(spec, path)
    check_points(spec, pts, path)
    out = Path(spec["out_dir"])
    total = sum(p.plan["gpu_hours"] for p in pts)
    for i, p in enumerate(pts):
        state = "todo"
        if (out / p.name / DONE).is_file():
            state = "done"
        elif (out / p.name / FAILED).is_file():
            state = "failed"
        c = p.plan
        print(f"[sweep] {i:>3} {p.name}: {c['params'] / 1e6:.2f} M params, {c['training_flops']:.3g} FLOP, "
              f"{c['gpu_hours']:.3g} GPU-h, {c['memory_gib']:.2f} GiB/GPU  [{state}]")  # fmt: skip
    print(f"[sweep] {len(pts)} points, {total:.3g} GPU-hours planned")
    if dry_run:
        if launcher == "slurm":
            print(slurm_line(path, spec, len(pts)))
        return 0
    claim_dir(spec, path, pts)
    if launcher == "slurm":
        line = slurm_line(path, spec, len(pts))
        print(line)
        return subprocess.run(line, shell=True).returncode
    failed = []
    for i, p in enumerate(pts):
        if (point is not None and i != point) or (out / p.name / DONE).is_file():
            continue
        t0 = time.perf_counter()
        rc = launch_point(spec, p, launcher, int(spec.get("gpus", 1)))
        seconds = time.perf_counter() - t0
        (out / p.name).mkdir(parents=True, exist_ok=True)
        if rc == 0:
            (out / p.name / FAILED).unlink(missing_ok=True)
            (out / p.name / DONE).write_text(json.dumps({"seconds": seconds, "plan": p.plan}) + "\n")
        else:
            (out / p.name / FAILED).write_text(f"exit {rc} after {seconds:.0f} s\n")
            failed.append(p.name)
    for name in failed:
        print(f"[sweep] FAILED {name} (retried on the next call): {out / name / FAILED}")
    print(f"[sweep] report: mimscale sweep report {out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``mimscale sweep SPEC ...`` or ``mimscale sweep report DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from mimscale.scaling.report import main as report_main

        return report_main(argv[1:])
    p = argparse.ArgumentParser(prog="mimscale sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("spec")
    p.add_argument("--launcher", choices=["local", "nproc", "slurm"], default="local")
    p.add_argument("--dry-run", action="store_true", help="print the points, their planned cost, the total")
    p.add_argument("--point", type=int, default=None, help="run only this point (a Slurm array task)")
    a = p.parse_args(argv)
    return run_sweep(spec_path(a.spec), a.launcher, a.dry_run, a.point)


SPECS = Path(__file__).resolve().parent / "specs"


def spec_path(name: str) -> Path:
    """A spec file, or a shipped spec's name (``digits_cpu``: ``mimscale/scaling/specs``)."""
    for p in (Path(name), SPECS / name, SPECS / f"{name}.yaml"):
        if p.is_file():
            return p
    shipped = ", ".join(sorted(q.stem for q in SPECS.glob("*.yaml")))
    raise RecipeError(f"{name}: no such sweep spec (a file, or a shipped one: {shipped})")
