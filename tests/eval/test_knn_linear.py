"""kNN (DINO vote) and the linear probe on features with a known answer, then on real digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mimscale.eval.hooks import EvalConfig, _loader, evaluate
from mimscale.eval.knn import knn_accuracy, knn_predict
from mimscale.eval.linear import LinearProbeHead, fit_linear_probe, linear_probe_accuracy
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def clusters(n_per: int, classes: int = 4, dim: int = 16, spread: float = 0.1, seed: int = 0):
    """Gaussian clusters around orthogonal centres: perfectly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 3.0
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_separable_clusters_are_perfect() -> None:
    xb, yb = clusters(50)
    xv, yv = clusters(20, seed=1)
    assert knn_accuracy(xb, yb, xv, yv) == 100.0


def test_knn_vote_is_temperature_weighted() -> None:
    """Two far neighbours of class 0 vs one close neighbour of class 1: exp(cos / T) decides."""
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])  # cos to the query: 1, 0.8, 0.8
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.07)
    assert torch.allclose(scores, torch.tensor([[2 * math.exp(0.8 / 0.07), math.exp(1 / 0.07)]]), rtol=1e-4)
    assert scores.argmax().item() == 1  # the close neighbour wins at T = 0.07 ...
    hot = knn_predict(bank, labels, query, num_classes=2, k=3, temperature=10.0)
    assert hot.argmax().item() == 0  # ... a plain majority at a high temperature


def test_knn_rejects_unlabeled_bank() -> None:
    with pytest.raises(ValueError, match="drop them first"):
        knn_predict(torch.randn(3, 2), torch.tensor([0, -1, 1]), torch.randn(1, 2), num_classes=2)


def test_linear_probe_separable_clusters() -> None:
    xb, yb = clusters(50, spread=0.5)
    xv, yv = clusters(20, spread=0.5, seed=1)
    assert linear_probe_accuracy(xb, yb, xv, yv, max_iter=50) >= 98.0
    a = fit_linear_probe(xb, yb, 4, max_iter=5, seed=3)
    b = fit_linear_probe(xb, yb, 4, max_iter=5, seed=3)
    assert torch.equal(a.fc.weight, b.fc.weight)  # deterministic for a seed
    assert not a.training


def test_probe_head_is_mae_protocol() -> None:
    head = LinearProbeHead(8, 3)
    assert not head.bn.affine and head.bn.eps == 1e-6
    assert head.fc.weight.std() < 0.02 and torch.all(head.fc.bias == 0)


def test_knn_and_probe_on_digits_pixels(digits) -> None:
    """Real digits through the evaluation loader: raw pixels are a strong known baseline."""
    r = load_recipe(
        REPO / "recipes/mae/cpu_tiny.yaml",
        [f"data.train={digits['train']}", f"data.val={digits['val']}", "data.num_workers=0"],
    )

    def pixels(src: str):
        xs, ys = [], []
        for b in _loader(r, src, EvalConfig(batch_size=512), 0, 1):
            xs.append(b["views"][0][b["valid"]].float().flatten(1))
            ys.append(b["labels"][b["valid"]])
        return torch.cat(xs), torch.cat(ys)

    (xb, yb), (xv, yv) = pixels(digits["train"]), pixels(digits["val"])
    assert len(yb) == digits["num_train"] and len(yv) == digits["num_val"]  # every sample once
    assert knn_accuracy(xb, yb, xv, yv) > 90.0
    assert linear_probe_accuracy(xb, yb, xv, yv, max_iter=50) > 85.0


def test_evaluate_random_encoder_on_digits(digits, capsys) -> None:
    from mimscale.methods import build_method

    r = load_recipe(
        REPO / "recipes/mae/cpu_tiny.yaml",
        [f"data.train={digits['train']}", f"data.val={digits['val']}", "data.num_workers=0"],
    )
    torch.manual_seed(0)
    method = build_method(r).eval()
    res = evaluate(method, r, EvalConfig(at_end=True, linear_iters=50), torch.device("cpu"))
    assert res["num_train"] == digits["num_train"] and res["num_val"] == digits["num_val"]
    assert 10.0 < res["knn_top1"] <= 100.0 and 10.0 < res["linear_top1"] <= 100.0
    assert "features:" not in capsys.readouterr().err  # the training loop's evaluations stay quiet
    again = evaluate(method, r, EvalConfig(at_end=True, linear_iters=50), torch.device("cpu"), progress=True)
    assert again == res
    err = capsys.readouterr().err  # standalone tools (mimscale eval, the demo) show progress bars
    assert "features: bank" in err and "features: val" in err
