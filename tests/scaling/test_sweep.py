"""``mimscale sweep``: a 2x2 grid of real runs, its report against the runs' metrics.jsonl, and
the bad inputs refused before anything is launched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mimscale.cli import main
from mimscale.registry import load_recipe
from mimscale.scaling import sweep

READOUTS = ["knn_top1", "linear_top1"]


def write_spec(tmp_path: Path, digits: dict, **changes) -> Path:
    spec = {
        "name": "grid",
        "out_dir": str(tmp_path / "sweep"),
        "axes": {
            "recipe": ["mae/cpu_tiny", "mto/mae_cpu_tiny"],
            "size": [
                {"label": "w32d1", "model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2},
                {"label": "w48d2", "model.embed_dim": 48, "model.depth": 2, "model.num_heads": 4},
            ],
        },
        "overrides": [f"data.train={digits['train']}", f"data.val={digits['val']}", "train.max_steps=2",
                      "train.global_batch=32", "train.micro_batch=32", "eval.at_end=true", "eval.pool=mean",
                      "eval.linear_iters=5", "train.recon_every=0", "data.num_workers=0"],
        "readouts": READOUTS,
        "gpus": 1, "gpu_mem": 16, "gpu_tflops": 1, "mfu": 0.1,
    }  # fmt: skip
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_2x2_grid_runs_and_reports_its_runs_numbers(tmp_path, digits, capsys) -> None:
    path = write_spec(tmp_path, digits)
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "sweep"
    names = sorted(p.name for p in out.iterdir() if (p / "sweep_done.json").is_file())
    assert len(names) == 4
    stamps = {n: (out / n / "sweep_done.json").stat().st_mtime_ns for n in names}
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0  # finished points are skipped
    assert capsys.readouterr().out.count("[done]") == 4
    assert stamps == {n: (out / n / "sweep_done.json").stat().st_mtime_ns for n in names}

    assert main(["sweep", "report", str(out)]) == 0
    rows = {r["point"]: r for r in csv.DictReader((out / "sweep_report.csv").open())}
    meta = json.loads((out / "sweep.json").read_text())
    for p in meta["points"]:
        lines = [json.loads(x) for x in (out / p["name"] / "metrics.jsonl").read_text().splitlines() if x]
        row = rows[p["name"]]
        for k in READOUTS:
            last = [rec[f"eval/{k}"] for rec in lines if f"eval/{k}" in rec][-1]
            assert float(row[k]) == pytest.approx(last, abs=0.005)
        step = max(rec["step"] for rec in lines)
        gb = load_recipe(out / p["name"] / "recipe.yaml").train.global_batch
        assert int(row["steps"]) == step == 2
        assert float(row["training_flops"]) == pytest.approx(
            p["plan"]["train_flops_per_image"] * step * gb, rel=1e-3
        )
    assert {r["method"] for r in rows.values()} == {"mae", "mae+mto"}
    assert (out / "sweep_report.png").stat().st_size > 10_000
    assert "| point |" in (out / "sweep_report.md").read_text()


def test_dry_run_prints_points_costs_and_the_slurm_array(tmp_path, digits, capsys) -> None:
    path = write_spec(tmp_path, digits)
    assert main(["sweep", str(path), "--dry-run", "--launcher", "slurm"]) == 0
    text = capsys.readouterr().out
    assert (
        text.count("GPU-h, ") == 4
        and text.count("[todo]") == 4
        and "4 points" in text
        and "sbatch --array=0-3" in text
    )
    assert not (tmp_path / "sweep").exists()  # nothing written, nothing launched


def refused(capsys, path: Path) -> str:
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_specs_are_one_line_and_launch_nothing(tmp_path, digits, capsys) -> None:
    assert "unknown sweep key 'axis'" in refused(capsys, write_spec(tmp_path, digits, axis={}))
    bad_axis = {"recipe": ["mae/cpu_tiny"], "mask.ratio": [0.5, "lots"]}
    err = refused(capsys, write_spec(tmp_path, digits, axes=bad_axis))
    assert "point mae-cpu_tiny__mask.ratio-lots" in err and "mask.ratio" in err
    err = refused(capsys, write_spec(tmp_path, digits, gpu_mem=0.5))
    assert (
        "does not fit 1 x custom" in err and "GiB per GPU" in err and "point mae-cpu_tiny__size-w32d1" in err
    )
    assert not (tmp_path / "sweep").exists()


def test_a_directory_of_another_spec_is_refused(tmp_path, digits, capsys) -> None:
    first = write_spec(tmp_path, digits)
    spec = sweep.read_spec(first)
    pts = sweep.points(spec, first)
    sweep.check_points(spec, pts, first)
    sweep.claim_dir(spec, first, pts)
    other = write_spec(tmp_path, digits, name="other")
    assert "holds the sweep 'grid' of another spec" in refused(capsys, other)


def test_the_shipped_cpu_spec_has_nine_points_that_plan(tmp_path) -> None:
    spec_file = sweep.spec_path("digits_cpu")
    spec = sweep.read_spec(spec_file)
    spec["out_dir"] = str(tmp_path / "sweep")
    pts = sweep.points(spec, spec_file)
    assert len(pts) == 9 and {p.recipe for p in pts} == {
        "mae/cpu_tiny",
        "mto/mae_cpu_tiny",
        "cae_v2/cpu_tiny",
    }
    sweep.check_points(spec, pts, spec_file)
    assert {p.plan["method"] for p in pts} == {"mae", "mae+mto", "cae_v2"}
    for method in ("mae", "mae+mto", "cae_v2"):  # compute grows with the student within a method
        flops = [p.plan["training_flops"] for p in pts if p.plan["method"] == method]
        assert flops == sorted(flops) and len(flops) == 3


def test_paper_references_count_compute_as_the_points_do() -> None:
    """MAE's B/L/H fine-tuning results, each at the plan's FLOPs per image of the recipe it names x
    ImageNet-1K x 1600 epochs; a readout the table does not have gets none."""
    from mimscale.config.paths import recipe_path
    from mimscale.scaling.memory import train_flops
    from mimscale.scaling.report import reference_points

    refs = reference_points("top1")
    assert [(r["size"], r["value"]) for r in refs] == [("B/16", 83.6), ("L/16", 85.9), ("H/14", 86.9)]
    for r in refs:
        per_image, _ = train_flops(load_recipe(recipe_path(r["recipe"])))
        assert r["training_flops"] == per_image * 1_281_167 * 1600
    assert refs[0]["training_flops"] < refs[1]["training_flops"] < refs[2]["training_flops"]
    assert reference_points("knn_top1") == []


def test_report_overlays_references_and_goes_to_the_sweeps_wandb_run(tmp_path, digits, monkeypatch) -> None:
    """One finished point whose recipe logs to wandb (offline): the table and the plot go to one
    wandb run of the sweep directory; with a fine-tuning readout the paper points are drawn."""
    from mimscale.config.derived import save_recipe
    from mimscale.config.paths import recipe_path
    from mimscale.scaling.report import report

    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_spec(tmp_path, digits, readouts=["top1", "knn_top1"])
    spec = sweep.read_spec(path)
    pts = sweep.points(spec, path)
    sweep.check_points(spec, pts, path)
    out = sweep.claim_dir(spec, path, pts)
    run = out / pts[0].name
    over = [*sweep.point_overrides(spec, pts[0]), "wandb.enabled=true", "wandb.mode=offline"]
    save_recipe(load_recipe(recipe_path(pts[0].recipe), over), run / "recipe.yaml")
    line = json.dumps({"step": 2, "eval/top1": 41.0, "eval/knn_top1": 30.0})
    (run / "metrics.jsonl").write_text(line + "\n")
    (run / sweep.DONE).write_text(json.dumps({"seconds": 3.0}))
    got = report(out)
    assert [r["size"] for r in got["references"]] == ["B/16", "L/16", "H/14"]
    assert got["wandb"] is True
    wid = (out / "wandb_id").read_text().strip()
    offline = list((out / "wandb").glob(f"offline-run-*-{wid}*"))
    assert offline and list(offline[0].glob("files/media/images/sweep/report_*.png"))
    assert list(offline[0].glob("files/media/table/sweep/table_*.table.json"))
    # the same report without wandb in the point's recipe sends nothing
    plain = load_recipe(recipe_path(pts[0].recipe), sweep.point_overrides(spec, pts[0]))
    save_recipe(plain, run / "recipe.yaml")
    assert report(out)["wandb"] is False
