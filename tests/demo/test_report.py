"""`mimscale demo` end to end, shortened: the eval hook logs curves, the report compares with the
same encoder at random initialisation and writes the table's JSON and the PNG."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys, monkeypatch) -> None:
    """The default demo (MAE + MTO) names its plug-in in the table, the JSON and the plot title; a
    second run in the same directory says it reused the finished run instead of timing 0 steps."""
    import mimscale.demo.report as report
    from mimscale.demo.run import run_demo

    titles: list[str] = []
    plot = report._plot
    monkeypatch.setattr(
        report, "_plot", lambda recs, rand, out, title: (titles.append(title), plot(recs, rand, out, title))
    )
    over = ["train.max_steps=2", "eval.every=2", "eval.linear_iters=20", "data.num_workers=1"]
    assert run_demo(out=tmp_path, overrides=over) == 0
    run = tmp_path / "mae_mto"
    res = json.loads((run / "demo_results.json").read_text())
    assert res["steps"] == 2 and res["pool"] == "mean" and res["method"] == "mae + mto"
    for row in ("random_init", "pretrained"):
        assert set(res[row]) == {"knn_top1", "linear_top1"} and all(0 < v <= 100 for v in res[row].values())
    assert (run / "demo_curves.png").stat().st_size > 0
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/knn_top1" in x]
    assert [e["step"] for e in evals] == [2]
    out = capsys.readouterr().out
    assert "random init (same weights, step 0)" in out and "pre-trained (mae + mto, 2 steps)" in out
    assert "finished in" in out and "reusing" not in out
    assert "mimscale demo --method mae_mto --seeds 0,1,2 measures the spread" in out
    assert titles and titles[-1].startswith("mae + mto on digits")

    assert run_demo(out=tmp_path, overrides=over) == 0  # again, same directory: nothing to train
    out = capsys.readouterr().out
    assert f"reusing the earlier run in {run} (logged up to step 2)" in out and "--out ANOTHER_DIR" in out
    assert "nothing left to train (the run had finished at step 2)" in out and "finished in" not in out
    assert json.loads((run / "demo_results.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_compare_smoke(tmp_path, capsys, monkeypatch) -> None:
    """Two methods, one with the (1-epoch) digits teacher: one table, one JSON, one PNG."""
    from dataclasses import replace

    import mimscale.demo.teacher as teacher
    from mimscale.demo.compare import run_compare

    real = teacher.train_digits_teacher
    one_epoch = replace(teacher.TeacherRecipe(), epochs=1)
    monkeypatch.setattr(
        teacher, "train_digits_teacher", lambda out, cfg=None, log=print: real(out, one_epoch, log)
    )
    over = ["train.max_steps=2", "eval.every=2", "eval.linear_iters=5", "data.num_workers=1"]
    assert run_compare("mae,cae_v2", tmp_path, over) == 0
    rows = json.loads((tmp_path / "compare_results.json").read_text())
    assert [r["method"] for r in rows] == ["mae", "cae_v2"] and all(r["steps"] == 2 for r in rows)
    for r in rows:
        for part in ("trained", "random_init"):
            assert set(r[part]) == {"mean", "cls"}
    assert rows[0]["teacher"] is None and "supervised digits ViT" in rows[1]["teacher"]
    assert (tmp_path / "compare_curves.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "takes about" in out and "cls linear" in out and "teacher timm:vit_tiny_patch16_224" in out
