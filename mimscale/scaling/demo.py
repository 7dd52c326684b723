"""``mimscale demo --sweep``: the shipped CPU sweep (``specs/digits_cpu.yaml``) on the digits data.

Writes the digits shards, trains the supervised digits teacher (CAE v2's), writes a copy of the
spec with the data paths, the teacher keys and ``out_dir`` filled in, runs it and writes the report.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

SPEC = "digits_cpu"


def demo_spec(out: Path, overrides: list[str]) -> Path:
    """The shipped spec, made runnable here: ``out/sweep_spec.yaml``."""
    from mimscale.demo.data import write_digits_shards
    from mimscale.demo.teacher import teacher_overrides, train_digits_teacher
    from mimscale.scaling.sweep import spec_path

    spec = yaml.safe_load(spec_path(SPEC).read_text())
    paths = write_digits_shards(out / "data")
    info = train_digits_teacher(out / "teacher", log=lambda s: print(f"[mimscale demo] {s}"))
    spec["out_dir"] = str(out / "sweep")
    data = [f"data.train={paths['train']}", f"data.val={paths['val']}"]
    spec["overrides"] = [*data, *spec.get("overrides", []), *overrides]
    spec["teacher_overrides"] = teacher_overrides(info)
    path = out / "sweep_spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_demo_sweep(out: Path, overrides: list[str]) -> int:
    """Run the CPU sweep and its report; returns an exit code."""
    from mimscale.scaling.report import main as report_main
    from mimscale.scaling.sweep import run_sweep

    t0 = time.perf_counter()
    rc = run_sweep(demo_spec(out, overrides))
    report_main([str(out / "sweep")])
    print(f"[mimscale demo] sweep finished in {time.perf_counter() - t0:.0f} s")
    return rc
