"""MR-MAE: the mimic loss by hand, L = 0.5 L_R + 0.5 L_M against MAE, focused selection (top-k
exact, sampling frequencies), multi-layer fusion, the amortised teacher, recipe checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_methods import tiny_method

from mimscale.config import RecipeError
from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import build_target_provider, prepare_batch
from mimscale.masking import batch_noise, build_mask_generator, focused_mask
from mimscale.methods.common import patchify, pixel_mse_loss
from mimscale.methods.mr_mae import fusion_layers, mimic_loss
from mimscale.registry import load_recipe
from mimscale.teachers import TeacherTargets

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def build(*overrides: str):
    r, method = tiny_method("mr_mae", *overrides)
    return r, method.eval()


def batch_of(r, repeats: int = 1, seed: int = 0) -> dict:
    raw = synthetic_batch(r, seed)
    gen = build_mask_generator(r.mask, (8, 8), 32, 4)
    rng = np.random.default_rng(seed)
    raw["mask"] = torch.from_numpy(np.stack([gen(rng) for _ in range(4 * repeats)]))
    raw["mask_noise"] = batch_noise(seed, 0, raw["keys"], 64, repeats)
    return raw


def test_mimic_loss_hand_computed() -> None:
    pred, target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.zeros(1, 2, 2)
    assert mimic_loss(pred, target, "mean").item() == pytest.approx((2.5 + 12.5) / 2)
    assert mimic_loss(pred, target, "sum_channels").item() == pytest.approx((5 + 25) / 2)
    assert mimic_loss(pred, target, "mean", torch.tensor([[1.0, 0.0]])).item() == pytest.approx(2.5)


def test_total_loss_is_half_mae_plus_half_hand_mimic() -> None:
    """Mimic head = bias c only; teacher patch tokens = t_i (constant per token): L_M by hand.
    L_R equals MAE's pixel loss through the same encoder and decoder."""
    r, m = build("mr_mae.focused=none", "mr_mae.fusion=false", "teacher.cls_attn=false")
    batch = prepare_batch(batch_of(r), CPU, torch.float32)
    mask = batch["mask"]
    c = m.mimic_head.out_features
    with torch.no_grad():
        m.mimic_head.weight.zero_()
        m.mimic_head.bias.fill_(0.5)
    values = torch.arange(65, dtype=torch.float32) / 10  # token i has every channel = i / 10
    tokens = values.view(1, 65, 1).expand(4, 65, c)
    out = m(batch, mask, TeacherTargets(tokens, None))
    vis = [torch.nonzero(~row).flatten() + 1 for row in mask]  # token index of each visible patch
    l_m = torch.stack([((0.5 - values[v]) ** 2).mean() for v in vis]).mean()
    images = batch["images"][0]
    dec = m.decoder(m.encoder(images, mask, mode="visible").x, mask)
    l_r = pixel_mse_loss(dec.pred, patchify(images, 4), mask, norm_pix=True)
    assert out.metrics["loss_mimic"].item() == pytest.approx(l_m.item(), rel=1e-6)
    torch.testing.assert_close(out.loss, 0.5 * l_r + 0.5 * l_m)


def test_topk_focus_is_exact_and_sampling_follows_the_attention() -> None:
    s = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    assert focused_mask(s, 2, "topk").tolist() == [[True, False, True, False]]  # keeps tokens 1 and 3
    g = torch.Generator().manual_seed(0)
    draws = focused_mask(s.expand(40000, -1), 1, "sample", torch.rand(40000, 4, generator=g))
    freq = (~draws).float().mean(0)
    torch.testing.assert_close(freq, s[0], atol=0.01, rtol=0)  # 5 sigma ~ 0.012 at worst
    two = focused_mask(s.expand(1000, -1), 2, "sample", torch.rand(1000, 4, generator=g))
    assert ((~two).sum(1) == 2).all()  # without replacement: exactly |V| distinct tokens
    with pytest.raises(ValueError, match="mask_noise"):
        focused_mask(s, 1, "sample")


def test_sampling_without_replacement_matches_sequential_draws_by_hand() -> None:
    """|V| = 2 of 4: P({i, j}) = s_i s_j / (1 - s_i) + s_j s_i / (1 - s_j), the sequential
    draws of torch.multinomial(replacement=False), which the Gumbel top-k over the batch noise
    must reproduce in distribution."""
    s = [0.1, 0.4, 0.2, 0.3]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    hand = torch.tensor([s[i] * s[j] / (1 - s[i]) + s[j] * s[i] / (1 - s[j]) for i, j in pairs])
    assert hand.sum().item() == pytest.approx(1.0)
    n = 60000
    noise = batch_noise(0, 0, [str(k) for k in range(n)], 4)  # the data side's own noise
    visible = ~focused_mask(torch.tensor([s]).expand(n, -1), 2, "sample", noise)
    freq = torch.tensor([(visible[:, i] & visible[:, j]).float().mean().item() for i, j in pairs])
    torch.testing.assert_close(freq, hand, atol=0.01, rtol=0)  # 5 sigma ~ 0.0098 at worst (p ~ 0.33)
    g = torch.Generator().manual_seed(1)  # the old draw, an independent formulation
    ids = torch.multinomial(torch.tensor([s]).expand(n, -1), 2, replacement=False, generator=g)
    old = torch.zeros(n, 4, dtype=torch.bool).scatter(1, ids, True)
    old_freq = torch.tensor([(old[:, i] & old[:, j]).float().mean().item() for i, j in pairs])
    torch.testing.assert_close(freq, old_freq, atol=0.014, rtol=0)


def test_method_masks_follow_the_teacher_attention() -> None:
    r, m = build("mr_mae.focused=topk")
    m.return_stack_hidden = True
    batch = prepare_batch(batch_of(r), CPU, torch.float32)
    t = build_target_provider(r, CPU)(batch)
    out = m(batch, batch["mask"], t)
    n_vis = 64 - int(batch["mask"][0].sum())
    expected = torch.ones(4, 64, dtype=torch.bool).scatter(1, t.cls_attn.topk(n_vis, 1).indices, False)
    assert torch.equal(out.aux["stack_mask"], expected)


def test_mimic_subset_mimics_the_most_attended_visible_tokens() -> None:
    r, m = build("mr_mae.focused=mimic_subset", "mr_mae.mimic_subset_ratio=0.25", "mr_mae.fusion=false")
    batch = prepare_batch(batch_of(r), CPU, torch.float32)
    mask = batch["mask"]
    c = m.mimic_head.out_features
    with torch.no_grad():
        m.mimic_head.weight.zero_()
        m.mimic_head.bias.zero_()
    values = torch.arange(65, dtype=torch.float32) / 10
    attn = torch.softmax(torch.randn(4, 64), dim=1)
    out = m(batch, mask, TeacherTargets(values.view(1, 65, 1).expand(4, 65, c), attn))
    expected = []
    for b in range(4):
        vis = torch.nonzero(~mask[b]).flatten()
        top = vis[attn[b, vis].topk(round(0.25 * len(vis))).indices]
        expected.append((values[top + 1] ** 2).mean())
    assert out.metrics["loss_mimic"].item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)


def test_fusion_layers_and_single_layer_fusion_is_plain() -> None:
    cfg = build()[1].cfg
    assert fusion_layers(cfg, 12) == [4, 8, 12] and fusion_layers(cfg, 24) == [8, 16, 24]
    assert fusion_layers(cfg, 32) == [10, 21, 32]
    r, plain = build("mr_mae.focused=none", "mr_mae.fusion=false")
    _, last = build("mr_mae.focused=none", "mr_mae.fusion_layers=[4]")  # LN(block 4) = the final LN
    _, fused = build("mr_mae.focused=none")  # blocks {1, 2, 4} of the 4-block tiny encoder
    assert fused.fusion_layers == [1, 2, 4]
    batch = prepare_batch(batch_of(r), CPU, torch.float32)
    t = build_target_provider(r, CPU)(batch)
    lp, ll, lf = (x(batch, batch["mask"], t).loss for x in (plain, last, fused))
    torch.testing.assert_close(lp, ll)
    assert not torch.allclose(lp, lf)


def test_amortised_teacher_equals_running_the_teacher_twice() -> None:
    r, m = build("mask.repeats=2")  # default focused=sample: the same draws for the same seed
    provider = build_target_provider(r, CPU)
    raw = batch_of(r, repeats=2)
    once = prepare_batch(raw, CPU, torch.float32)
    twice = prepare_batch({**raw, "views": [raw["views"][0].repeat_interleave(2, 0)]}, CPU, torch.float32)
    loss_once = m(once, once["mask"], provider(once)).loss
    targets_twice = provider(twice)  # the teacher runs on 8 views
    torch.rand(10)  # the global RNG plays no part: the focused draws come from the batch noise
    torch.testing.assert_close(loss_once, m(twice, twice["mask"], targets_twice).loss)


def test_recipe_checks_name_the_key() -> None:
    with pytest.raises(RecipeError, match=r"teacher\.cls_attn"):
        build("teacher.cls_attn=false")
    with pytest.raises(RecipeError, match=r"mr_mae\.fusion_layers"):
        build("mr_mae.fusion_layers=[5]")
    with pytest.raises(RecipeError, match=r"mr_mae\.mimic_subset_ratio"):
        build("mr_mae.mimic_subset_ratio=0")


@pytest.mark.parametrize("name", ["b16", "b16_dino", "l16", "h14"])
def test_size_recipes(name: str) -> None:
    r = load_recipe(REPO / f"recipes/mr_mae/vit_{name}.yaml")
    assert r.mask.ratio == 0.75 and r.optim.blr == 1.5e-4 and r.train.global_batch == 1024
    t = r.teacher
    assert not t.proj and t.cls_attn and r.method_cfg.focused == "sample" and r.method_cfg.fusion
    assert t.kind == ("timm" if name == "b16_dino" else "open_clip")
