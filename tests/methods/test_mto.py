"""MTO (docs/methods.md §5): H^l and every term against hand values and a per-sample loop, gradients
(L_e reaches the mask token, rank_sign flips L_r), the plug-in wiring and recipe validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mimscale.config import RecipeError
from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import prepare_batch, seed_everything
from mimscale.methods import METHODS, Method, build_method
from mimscale.methods.mto import (
    MTOConfig,
    MTOLoss,
    distinctiveness_loss,
    heterogeneity,
    ranking_loss,
    sparsity_loss,
)
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY_BATCH = ["train.micro_batch=4", "train.global_batch=4"]


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------- hand values


def test_heterogeneity_hand_values() -> None:
    # rows 0, 1 masked; rows 2, 3 visible. Row 0 . (x2, x3) = (1, 0); row 1 . (x2, x3) = (2, 1).
    x = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True, False, False]])
    expect = (entropy(softmax([1.0, 0.0])) + entropy(softmax([2.0, 1.0]))) / 2
    assert heterogeneity(x, mask).item() == pytest.approx(expect, rel=1e-6)
    # logit_scale multiplies the logits: 0.5 -> (0.5, 0) and (1, 0.5).
    expect = (entropy(softmax([0.5, 0.0])) + entropy(softmax([1.0, 0.5]))) / 2
    assert heterogeneity(x, mask, 0.5).item() == pytest.approx(expect, rel=1e-6)
    # inv_sqrt_d = 1 / sqrt(2)
    s = 2**-0.5
    expect = (entropy(softmax([s, 0.0])) + entropy(softmax([2 * s, s]))) / 2
    assert heterogeneity(x, mask, "inv_sqrt_d").item() == pytest.approx(expect, rel=1e-6)


def test_identical_mask_tokens_at_layer_zero() -> None:
    # SimMIM's layer 0: every masked row is the same mask token m (docs/methods.md §5.4).
    vis = torch.tensor([[0.5, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # |V| = 3
    m = torch.tensor([0.2, -0.4, 0.6])
    x = torch.cat([m.expand(4, 3), vis]).unsqueeze(0)  # 4 identical masked rows, then 3 visible
    mask = torch.tensor([[True] * 4 + [False] * 3])
    one_row = entropy(softmax((vis @ m).tolist()))
    assert heterogeneity(x, mask).item() == pytest.approx(one_row, rel=1e-6)
    # A zero mask token has the same affinity to every visible token: H^0 = log |V|, its maximum.
    x0 = torch.cat([torch.zeros(4, 3), vis]).unsqueeze(0)
    assert heterogeneity(x0, mask).item() == pytest.approx(math.log(3), rel=1e-6)


def test_sparsity_loss_hand_values() -> None:
    # 3 tokens, rows 0 and 2 visible, row 1 masked; every column (masked ones too) counts.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[False, True, False]])
    row0 = entropy(softmax([1.0, 0.0, 1.0]))  # x0 . (x0, x1, x2)
    row2 = entropy(softmax([1.0, 1.0, 2.0]))  # x2 . (x0, x1, x2)
    assert sparsity_loss(x, mask, reduction="sum").item() == pytest.approx(row0 + row2, rel=1e-6)
    assert sparsity_loss(x, mask, reduction="mean").item() == pytest.approx((row0 + row2) / 2, rel=1e-6)
    nodiag = (entropy(softmax([0.0, 1.0])) + entropy(softmax([1.0, 1.0]))) / 2
    assert sparsity_loss(x, mask, exclude_diag=True).item() == pytest.approx(nodiag, rel=1e-6)


def test_distinctiveness_and_ranking_hand_values() -> None:
    h0 = torch.tensor([0.5, 2.0])
    assert torch.allclose(distinctiveness_loss(h0, eps=1e-6), 1 / (h0 + 1e-6))
    h = torch.tensor([[2.0], [1.0], [1.5]])  # H^0, H^1, H^2 of one sample
    sp = lambda v: math.log1p(math.exp(v))
    assert ranking_loss(h, "intent").item() == pytest.approx(sp(1 - 2) + sp(1.5 - 1), rel=1e-6)
    assert ranking_loss(h, "paper_literal").item() == pytest.approx(sp(2 - 1) + sp(1 - 1.5), rel=1e-6)
    # equal H everywhere: the constant L * log 2 of docs/methods.md §5.3c
    assert ranking_loss(torch.ones(9, 1), "intent").item() == pytest.approx(8 * math.log(2), rel=1e-6)


# ----------------------------------------------------------------------------- independent loop


def loop_terms(hidden: list[torch.Tensor], mask: torch.Tensor, cfg: MTOConfig) -> torch.Tensor:
    """The total MTO loss from explicit per-sample gathers (no masking tricks), in float64."""
    totals = []
    for b in range(mask.shape[0]):
        m = mask[b]
        hs = []
        for x in hidden:
            xm, xv = x[b][m].double(), x[b][~m].double()
            a = torch.softmax(xm @ xv.T, dim=1)
            hs.append(-(a * a.log()).sum(1).mean())
        x0 = hidden[0][b].double()
        p = torch.softmax(x0 @ x0.T, dim=1)[~m]
        spa = -(p * p.log()).sum(1)
        spa = spa.mean() if cfg.spa_reduction == "mean" else spa.sum()
        le = 1 / (hs[0] + cfg.eps)
        sign = 1.0 if cfg.rank_sign == "intent" else -1.0
        lr = sum(torch.nn.functional.softplus(sign * (hs[i] - hs[i - 1])) for i in range(1, len(hs)))
        totals.append(cfg.lambda_spa * spa + cfg.lambda_e * le + cfg.lambda_r * lr)
    return torch.stack(totals).mean()


@pytest.mark.parametrize("rank_sign", ["intent", "paper_literal"])
@pytest.mark.parametrize("spa_reduction", ["mean", "sum"])
def test_mto_loss_matches_per_sample_loop(rank_sign: str, spa_reduction: str) -> None:
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, 10, 6
    hidden = [0.5 * torch.randn(b, n, d, generator=g) for _ in range(4)]
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate((3, 6, 7)):  # masked counts differ per sample
        mask[i, torch.randperm(n, generator=g)[:k]] = True
    cfg = MTOConfig(enabled=True, rank_sign=rank_sign, spa_reduction=spa_reduction,
                    lambda_spa=0.7, lambda_e=1.3, lambda_r=0.4)  # fmt: skip
    loss, metrics = MTOLoss(cfg)(hidden, mask)
    assert loss.item() == pytest.approx(loop_terms(hidden, mask, cfg).item(), rel=1e-5)
    assert set(metrics) == {"loss_spa", "loss_e", "loss_rank", "mto_h0", "mto_h1", "mto_h2", "mto_h3"}


def test_entropies_are_fp32_under_bf16_inputs() -> None:
    x = torch.randn(2, 5, 4).bfloat16()
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    assert heterogeneity(x, mask).dtype == torch.float32
    assert heterogeneity(x, mask).allclose(heterogeneity(x.float(), mask))


# ----------------------------------------------------------------------------- gradients


def tiny_host(name: str):
    r = load_recipe(REPO / "recipes" / name / "cpu_tiny.yaml", TINY_BATCH)
    seed_everything(0)
    method = METHODS[name](r)
    batch = prepare_batch(synthetic_batch(r), torch.device("cpu"), torch.float32)
    return r, method, batch


@pytest.mark.parametrize("name, token", [("mae", "decoder.mask_token"), ("simmim", "encoder.mask_token")])
def test_gradient_of_le_reaches_the_mask_token(name: str, token: str) -> None:
    _, method, batch = tiny_host(name)
    method.return_stack_hidden = True
    aux = method(batch, batch["mask"]).aux
    h0 = heterogeneity(aux["stack_hidden"][0], aux["stack_mask"], "inv_sqrt_d")
    distinctiveness_loss(h0).mean().backward()
    param = dict(method.named_parameters())[token]
    assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    # A small step against the gradient raises H^0 (L_e = 1 / H^0 falls).
    with torch.no_grad():
        param -= 1e-2 * param.grad / param.grad.norm()
        aux2 = method(batch, batch["mask"]).aux
        h0_after = heterogeneity(aux2["stack_hidden"][0], aux2["stack_mask"], "inv_sqrt_d")
    assert h0_after.mean() > h0.mean()


def test_rank_sign_flips_the_ranking_gradient() -> None:
    # Equal heterogeneity at every layer (the same features at every layer): the two signs give
    # exactly opposite gradients, and "intent" pushes H^0 up and H^L down.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[True, True, True, False, False, False], [True, False, True, False, True, False]])
    grads = {}
    for sign in ("intent", "paper_literal"):
        hidden = [base.clone().requires_grad_(True) for _ in range(3)]
        h = torch.stack([heterogeneity(x, mask) for x in hidden])
        h.retain_grad()
        ranking_loss(h, sign).mean().backward()
        grads[sign] = (h.grad.clone(), [x.grad.clone() for x in hidden])
    (hi, xi), (hp, xp) = grads["intent"], grads["paper_literal"]
    assert torch.allclose(hi, -hp)
    assert (hi[0] < 0).all() and (hi[-1] > 0).all()  # minimising raises H^0, lowers H^L
    for a, b in zip(xi, xp, strict=True):
        assert torch.allclose(a, -b, atol=1e-7)
    assert xi[0].abs().sum() > 0 and xi[-1].abs().sum() > 0  # (the middle layer's pulls cancel)


# ----------------------------------------------------------------------------- plug-in and recipe


def test_attach_adds_the_terms_and_keeps_the_host() -> None:
    r, host, batch = tiny_host("mae")
    r.mto = MTOConfig(enabled=True, logit_scale="inv_sqrt_d")
    seed_everything(0)
    with_mto = build_method(r)
    assert type(with_mto) is type(host)
    assert with_mto.state_dict().keys() == host.state_dict().keys()  # MAE+MTO loads into MAE
    assert with_mto.group_matcher() == host.group_matcher()
    with_mto.load_state_dict(host.state_dict())
    out = with_mto(batch, batch["mask"])
    host.return_stack_hidden = True
    ref = host(batch, batch["mask"])
    extra, _ = MTOLoss(r.mto)(ref.aux["stack_hidden"], ref.aux["stack_mask"])
    assert out.loss.item() == pytest.approx((ref.loss + extra).item(), rel=1e-6)
    assert "stack_hidden" not in out.aux  # dropped so nothing holds them after backward
    depth = r.method_cfg.decoder_depth
    assert {f"mto_h{i}" for i in range(depth + 1)} <= set(out.metrics) and "loss_pix" in out.metrics


def test_mto_on_a_method_without_mask_tokens_is_a_recipe_error(monkeypatch, tmp_path) -> None:
    @dataclass
    class NoTokensConfig:
        pass

    class NoTokens(Method):
        Config = NoTokensConfig
        feeds_mask_tokens = False

    monkeypatch.setitem(METHODS, "notokens", NoTokens)
    path = tmp_path / "r.yaml"
    path.write_text("method: notokens\noptim: {blr: 1.0e-4}\n")
    with pytest.raises(RecipeError, match=r"mto\.enabled: method notokens feeds no mask tokens") as e:
        load_recipe(path, ["mto.enabled=true"])
    assert str(path) in str(e.value)
    load_recipe(path)  # fine without MTO


def test_mto_recipe_keys() -> None:
    path = REPO / "recipes/mto/mae_cpu_tiny.yaml"
    r = load_recipe(path, ["mto.logit_scale=inv_sqrt_d", "mto.rank_sign=paper_literal"])
    assert r.mto.logit_scale == "inv_sqrt_d" and r.mto.rank_sign == "paper_literal"
    with pytest.raises(RecipeError, match=r"mto\.rank_sign: expected one of"):
        load_recipe(path, ["mto.rank_sign=down"])
    with pytest.raises(RecipeError, match=r"mto\.logit_scale: must be > 0"):
        load_recipe(path, ["mto.logit_scale=0"])
