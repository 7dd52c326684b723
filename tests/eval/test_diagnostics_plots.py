"""Diagnose UX: plot titles name run and step, a progress bar on request, RAUC overlap warning."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mimscale.eval.diagnostics import _plot, run_diagnostics, run_label
from mimscale.eval.rauc import main as rauc_main
from mimscale.eval.rauc import overlap

REPO = Path(__file__).resolve().parents[2]


def test_titles_progress_and_label(digits, tmp_path: Path, capsys) -> None:
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", [f"data.val={digits['val']}", "data.num_workers=0"])
    torch.manual_seed(0)
    enc = build_method(r).encoder.eval()
    run_diagnostics(
        enc, r, digits["val"], num_images=4, out_dir=tmp_path, label="mae_x step 7", progress=True
    )
    assert "diagnose" in capsys.readouterr().err  # the tqdm bar
    res = {
        n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("attention_distance", "heterogeneity")
    }
    titles = _plot(res, tmp_path, "mae_x step 7")
    assert all(t.endswith("mae_x step 7") for t in titles.values())
    run_diagnostics(enc, r, digits["val"], num_images=4, out_dir=tmp_path / "quiet", what=["spectrum"])
    assert "diagnose" not in capsys.readouterr().err


def test_run_label_from_a_run_dir(tmp_path: Path) -> None:
    tag = tmp_path / "myrun/checkpoints/step00001200"
    tag.mkdir(parents=True)
    (tag / "recipe.yaml").write_text("{}\n")
    (tag.parent / "LATEST").write_text("step00001200\n")
    assert run_label(tmp_path / "myrun") == "myrun step 1200"


def _metrics(path: Path, steps: list[int], values: list[float]) -> Path:
    path.mkdir(parents=True)
    recs = [{"step": s, "eval/linear_top1": v} for s, v in zip(steps, values, strict=True)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_rauc_warns_when_curves_barely_overlap(tmp_path: Path, capsys) -> None:
    a = _metrics(tmp_path / "a", [0, 100, 200, 300, 400], [10, 20, 30, 40, 50])
    b = _metrics(tmp_path / "b", [350, 400, 450], [45, 52, 60])
    assert overlap([0, 400], [350, 450]) == 50 / 400
    assert rauc_main([str(a), str(b), "--out", str(tmp_path / "o")]) == 0
    assert "share only 12%" in capsys.readouterr().err
    assert json.loads((tmp_path / "o/rauc.json").read_text())["overlap"] == 0.125
    c = _metrics(tmp_path / "c", [0, 200, 400], [10, 35, 55])
    assert rauc_main([str(a), str(c), "--out", str(tmp_path / "o2")]) == 0
    assert "warning" not in capsys.readouterr().err


def _wandb_run(path: Path, steps: list[int], values: list[float]) -> Path:
    run = _metrics(path, steps, values)
    (run / "recipe.yaml").write_text("wandb: {enabled: true, mode: offline, project: t}\n")
    return run


def _rauc_media(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*/files/media/images/diagnostics/rauc_*.png"))


def test_rauc_plot_goes_to_both_runs_wandb_or_the_one_named(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    a = _wandb_run(tmp_path / "a", [0, 100, 200], [10, 20, 30])
    b = _wandb_run(tmp_path / "b", [0, 100, 200], [10, 25, 35])
    assert rauc_main([str(a), str(b), "--out", str(tmp_path / "o")]) == 0
    assert len(_rauc_media(a)) == 1 and len(_rauc_media(b)) == 1
    for run in (a, b):  # into the run's own wandb run (its kept id), not a new one
        wid = (run / "wandb_id").read_text().strip()
        assert all(p.name.split("-")[3] == wid for p in (run / "wandb").glob("offline-run-*"))
    assert rauc_main([str(a), str(b), "--out", str(tmp_path / "o2"), "--wandb-run", str(b)]) == 0
    assert len(_rauc_media(a)) == 1 and len(_rauc_media(b)) == 2  # only b got the second plot
    capsys.readouterr()
    assert rauc_main([str(a), str(b), "--out", str(tmp_path / "o3"), "--wandb-run", str(tmp_path)]) == 2
    assert "--wandb-run" in capsys.readouterr().err
    # a run that does not log to wandb gets nothing
    c = _metrics(tmp_path / "c", [0, 100, 200], [10, 22, 31])
    assert rauc_main([str(a), str(c), "--out", str(tmp_path / "o4")]) == 0
    assert not (c / "wandb").exists() and len(_rauc_media(a)) == 2


def test_rauc_help_says_where_the_plot_goes(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit):
        rauc_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "wandb run of both runs" in text and "--wandb-run RUN" in text
