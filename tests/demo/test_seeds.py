"""`mimscale demo --seeds`: the demo once per seed, each against its own random init, and the spread."""

from __future__ import annotations

import json
import statistics

import pytest

from mimscale.demo.seeds import parse_seeds, summarise


def _res(seed: int, knn: tuple[float, float], lin: tuple[float, float]) -> dict:
    return {"seed": seed, "pretrained": {"knn_top1": knn[0], "linear_top1": lin[0]},
            "random_init": {"knn_top1": knn[1], "linear_top1": lin[1]}}  # fmt: skip


def test_summary_is_each_seeds_gain_over_its_own_init() -> None:
    rows = [
        _res(0, (83.0, 64.6), (97.0, 91.6)),
        _res(1, (84.0, 70.8), (97.5, 95.5)),
        _res(2, (86.0, 74.9), (96.5, 95.0)),
    ]
    s = summarise(rows)
    # by hand: kNN gains 18.4, 13.2, 11.1; linear 5.4, 2.0, 1.5
    assert s["seeds"] == [0, 1, 2]
    assert s["knn_top1"]["gains"] == pytest.approx([18.4, 13.2, 11.1])
    assert s["knn_top1"]["mean"] == pytest.approx(42.7 / 3)
    assert s["linear_top1"]["min"] == pytest.approx(1.5)
    # sample std (n - 1) of 5.4, 2.0, 1.5: mean 2.9667, squares 5.9211 + 0.9344 + 2.1511 = 9.0067 / 2
    assert s["linear_top1"]["std"] == pytest.approx((9.0067 / 2) ** 0.5, abs=1e-3)
    assert s["linear_top1"]["std"] == pytest.approx(statistics.stdev([5.4, 2.0, 1.5]))


@pytest.mark.parametrize("text", ["0", "0,0", "a,b", "1;2", ""])
def test_bad_seed_lists_are_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_cli_refuses_a_bad_seed_list_before_any_run(tmp_path, capsys) -> None:
    from mimscale.cli import main

    assert main(["demo", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "at least two different seeds" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("other", [["--compare", "mae,mae_mto"], ["--sweep"]])
def test_seeds_do_not_combine_with_compare_or_sweep(tmp_path, capsys, other) -> None:
    from mimscale.cli import main

    assert main(["demo", "--seeds", "0,1", *other, "--out", str(tmp_path)]) == 2
    assert f"does not combine with {other[0]}" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_two_seeds_run_apart_and_the_spread_is_printed(tmp_path, capsys) -> None:
    from mimscale.cli import main

    over = ["train.max_steps=2", "eval.every=2", "eval.linear_iters=20", "data.num_workers=1"]
    assert main(["demo", "--seeds", "0,1", "--out", str(tmp_path), *over]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "demo_seeds.json").read_text())
    runs = saved["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert [r["run_dir"] for r in runs] == [str(tmp_path / "mae_mto_seed0"), str(tmp_path / "mae_mto_seed1")]
    for r in runs:  # each run trained under its own seed
        recipe = (tmp_path / f"mae_mto_seed{r['seed']}" / "recipe.yaml").read_text()
        assert f"seed: {r['seed']}" in recipe
    # the two random inits differ (another seed), so the table is not one run printed twice
    assert runs[0]["random_init"] != runs[1]["random_init"]
    s = saved["summary"]["linear_top1"]
    gains = [r["pretrained"]["linear_top1"] - r["random_init"]["linear_top1"] for r in runs]
    assert s["gains"] == pytest.approx(gains) and s["std"] == pytest.approx(statistics.stdev(gains))
    assert f"linear gain: {s['mean']:+.1f} +- {s['std']:.1f} points" in out
    assert "2 seeds" in out and "measures the spread" not in out  # the one-seed hint only after one seed
