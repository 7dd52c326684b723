"""Each diagnostic on inputs with a known answer, then end to end on digits (JSON + PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mimscale.eval.diagnostics import (
    attention_distance,
    effective_rank,
    grid_distances,
    heterogeneity_per_layer,
    run_diagnostics,
    singular_spectrum,
)
from mimscale.eval.rauc import rauc, read_curve

REPO = Path(__file__).resolve().parents[2]


def test_uniform_attention_has_the_mean_pairwise_distance() -> None:
    # 2 x 2 grid, patch 16: from each patch the distances are 0, 16, 16, 16 * sqrt(2).
    attn = torch.full((3, 4, 5, 5), 1 / 5)  # [B, H, 1 + N, 1 + N], class token included
    d = attention_distance(attn, (2, 2), 16)
    assert d.shape == (4,)
    assert torch.allclose(d, torch.full((4,), 16 * (2 + math.sqrt(2)) / 4))
    assert grid_distances((2, 2), 16).mean().item() == pytest.approx(d[0].item())


def test_self_attention_has_zero_distance_and_neighbour_attention_one_patch() -> None:
    eye = torch.eye(9).expand(1, 2, 9, 9)
    assert torch.allclose(attention_distance(eye, (3, 3), 4), torch.zeros(2))
    right = torch.zeros(1, 1, 3, 3)  # 1 x 3 grid: every patch attends to its right / left neighbour
    right[0, 0, 0, 1] = right[0, 0, 1, 2] = right[0, 0, 2, 1] = 1.0
    assert attention_distance(right, (1, 3), 4).item() == pytest.approx(4.0)


def test_heterogeneity_of_identical_tokens_is_log_visible() -> None:
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True  # |V| = 4
    flat = torch.ones(2, 17, 8)  # class token + 16 identical patch tokens -> uniform affinities
    rows = 30 * torch.eye(8)[torch.arange(16) % 4]  # masked row i matches visible row 12 + i % 4 only
    peaked = torch.cat([torch.zeros(2, 1, 8), rows.expand(2, 16, 8)], dim=1)
    h = heterogeneity_per_layer([flat, peaked], mask)
    assert h[0] == pytest.approx(math.log(4), abs=1e-5)
    assert 0.0 <= h[1] < 1e-3


def test_spectrum_of_rank_one_and_orthogonal_features() -> None:
    u = torch.randn(5, 1)
    rank1 = (u @ torch.randn(1, 6)).expand(3, 5, 6)  # centring keeps rank <= 1
    s, r = singular_spectrum(rank1)
    assert s[0] == pytest.approx(1.0) and s[1:].abs().max() < 1e-5
    assert r.item() == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.ones(7)).item() == pytest.approx(7.0)


def test_rauc_known_values() -> None:
    e = [0.0, 5.0, 10.0]
    assert rauc(e, [0, 5, 10], e, [0, 5, 10]) == pytest.approx(1.0)  # identical curves
    # S1 = E on [0, 10] (area 50 above S1(0) = 0); S2 = E + 5 (area 100): RAUC = 2.
    assert rauc(e, [0, 5, 10], [0.0, 10.0], [5, 15]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="flat"):
        rauc(e, [3, 3, 3], e, [1, 2, 3])


def test_rauc_reads_eval_curves_from_metrics(tmp_path: Path) -> None:
    for name, acc in (("a", [10, 20, 30]), ("b", [10, 20, 30])):
        d = tmp_path / name
        d.mkdir()
        lines = [{"step": 1, "samples": 64, "loss": 1.0}]
        lines += [{"step": 10 * i, "samples": 640 * i, "eval/knn_top1": a} for i, a in enumerate(acc, 1)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    xs, ys = read_curve(tmp_path / "a", "eval/knn_top1")
    assert xs == [10, 20, 30] and ys == [10, 20, 30]
    from mimscale.eval.rauc import main

    assert (
        main(
            [str(tmp_path / "a"), str(tmp_path / "b"), "--key", "eval/knn_top1", "--out", str(tmp_path / "o")]
        )
        == 0
    )
    assert json.loads((tmp_path / "o/rauc.json").read_text())["rauc"] == pytest.approx(1.0)
    assert (tmp_path / "o/rauc.png").stat().st_size > 0


def test_run_diagnostics_on_digits_writes_json_and_png(digits, tmp_path: Path) -> None:
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", [f"data.val={digits['val']}", "data.num_workers=0"])
    torch.manual_seed(0)
    enc = build_method(r).encoder.eval()
    summary = run_diagnostics(enc, r, digits["val"], num_images=8, out_dir=tmp_path)
    for name in ("attention_distance", "heterogeneity", "spectrum"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["num_images"] == 8
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    att = json.loads((tmp_path / "attention_distance.json").read_text())
    assert len(att["mean"]) == enc.depth and len(att["per_head"][0]) == enc.num_heads
    # Bounded by the largest distance on the 8 x 8 grid of 4-px patches.
    assert all(0 < d <= 4 * 7 * math.sqrt(2) for d in att["mean"])
    het = json.loads((tmp_path / "heterogeneity.json").read_text())
    assert len(het["H"]) == enc.depth + 1 and all(0 <= h <= het["log_num_visible"] + 1e-5 for h in het["H"])
    assert set(summary) == {"attn_dist_last", "heterogeneity_last", "eff_rank_last"}
