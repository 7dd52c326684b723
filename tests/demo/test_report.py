"""`mimscale demo` end to end, shortened: the eval hook logs curves, the report compares with the
same encoder at random initialisation and writes the table's JSON and the PNG."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys) -> None:
    from mimscale.demo.run import run_demo

    rc = run_demo(
        "mae", tmp_path, ["train.max_steps=2", "eval.every=2", "eval.linear_iters=20", "data.num_workers=1"]
    )
    assert rc == 0
    run = tmp_path / "mae"
    res = json.loads((run / "demo_results.json").read_text())
    assert res["steps"] == 2 and res["pool"] == "mean"
    for row in ("random_init", "pretrained"):
        assert set(res[row]) == {"knn_top1", "linear_top1"} and all(0 < v <= 100 for v in res[row].values())
    assert (run / "demo_curves.png").stat().st_size > 0
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/knn_top1" in x]
    assert [e["step"] for e in evals] == [2]
    assert "random init (same weights, step 0)" in capsys.readouterr().out
