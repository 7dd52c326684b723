"""CAE v2: loss values for every supervision set and loss type, the regressor block written out,
the amortised teacher, the MTO stack, recipe checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_methods import tiny_method

from mimscale.config import RecipeError
from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import build_target_provider, prepare_batch
from mimscale.methods.cae_v2 import feature_loss
from mimscale.models.pos_embed import cae_sincos_pos_embed
from mimscale.models.regressor import RegressorBlock
from mimscale.registry import load_recipe
from mimscale.teachers import TeacherTargets

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def build(*overrides: str):
    r, method = tiny_method("cae_v2", *overrides)
    return r, method.eval()


@pytest.mark.parametrize(
    "kind, l2, expected",
    [
        ("cosine", True, 1 - 24 / 25),  # cos((3,4), (4,3)) = 24/25
        ("mse", True, 0.04),  # (0.6,0.8) - (0.8,0.6) = (-0.2, 0.2): mean square 0.04
        ("smooth_l1", True, 0.02),  # |d| < 1: 0.5 d^2 -> mean 0.02
        ("mse", False, 1.0),  # raw (3,4) - (4,3) = (-1, 1)
        ("smooth_l1", False, 0.5),  # |d| = 1: |d| - 0.5
    ],
)
def test_feature_loss_hand_computed(kind: str, l2: bool, expected: float) -> None:
    pred, target = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[4.0, 3.0]]])
    assert feature_loss(pred, target, kind, l2).item() == pytest.approx(expected, abs=1e-6)


def hand_targets(method, mask: torch.Tensor, v: torch.Tensor) -> TeacherTargets:
    """Teacher tokens: cls = v, visible patches orthogonal to v, masked patches = -v."""
    b, n = mask.shape
    u = torch.zeros_like(v)
    u[1] = 1.0
    tokens = torch.where(mask[..., None], -v, u).float()  # [B, N, C]
    return TeacherTargets(torch.cat([v.expand(b, 1, -1), tokens], dim=1), None)


@pytest.mark.parametrize(
    "supervise", [["cls", "visible"], ["cls", "visible", "masked"], ["visible"], ["masked"]]
)
@pytest.mark.parametrize("kind", ["cosine", "mse", "smooth_l1"])
def test_loss_hand_computed_per_supervision_set(supervise: list[str], kind: str) -> None:
    """Head FC = 0 weight + bias v: every prediction is v. Per-row losses are then known:
    cosine 0 / 1 / 2; mse (unit rows, C channels) 0 / 2/C / 4/C; smooth-L1 0 / 1/C / 1.5/C."""
    r, m = build(f"cae_v2.supervise={supervise}", f"cae_v2.loss={kind}")
    c = m.head[1].out_features
    v = torch.zeros(c)
    v[0] = 1.0
    with torch.no_grad():
        m.head[1].weight.zero_()
        m.head[1].bias.copy_(v)
    batch = prepare_batch(synthetic_batch(r), CPU, torch.float32)
    mask = batch["mask"]
    out = m(batch, mask, hand_targets(m, mask, v))
    per = {"cosine": (0.0, 1.0, 2.0), "mse": (0.0, 2 / c, 4 / c), "smooth_l1": (0.0, 1 / c, 1.5 / c)}[kind]
    n_m = int(mask[0].sum())
    counts = {"cls": 1, "visible": mask.shape[1] - n_m, "masked": n_m}
    value = {"cls": per[0], "visible": per[1], "masked": per[2]}
    expected = sum(counts[g] * value[g] for g in supervise) / sum(counts[g] for g in supervise)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for g in supervise:
        assert out.metrics[f"loss_{g}"].item() == pytest.approx(value[g], abs=1e-6)
    assert (m.regressor is not None) == ("masked" in supervise)  # no untrained regressor


def test_loss_rows_match_an_independent_per_sample_assembly() -> None:
    """Random weights: the batched [cls, visible, masked] reordering equals a per-sample loop."""
    r, m = build()
    batch = prepare_batch(synthetic_batch(r), CPU, torch.float32)
    mask = batch["mask"]
    t = build_target_provider(r, CPU)(batch)
    out = m(batch, mask, t)
    z = m.enc_to_reg(m.encoder(batch["images"][0], mask, mode="visible").x)
    pred_m = m.regressor(z, mask).masked
    losses = []
    for b in range(mask.shape[0]):
        vis, msk = torch.nonzero(~mask[b]).flatten(), torch.nonzero(mask[b]).flatten()
        rows = torch.cat([z[b, :1], z[b, 1:], pred_m[b]])
        tgt = torch.cat([t.tokens[b, :1], t.tokens[b, 1 + vis], t.tokens[b, 1 + msk]])
        losses.append(1 - F.cosine_similarity(m.head(rows), tgt, dim=-1))
    torch.testing.assert_close(out.loss, torch.cat(losses).mean())


def test_regressor_block_written_out() -> None:
    """§2.3: three LNs; pos on q and k, not v; q/v bias, no k bias; LN on the residual stream."""
    torch.manual_seed(0)
    blk = RegressorBlock(16, 2, 4.0, layer_scale=0.3, drop_path=0.0)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3)
    xq, xkv = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    pq, pkv = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    a = blk.attn
    q = F.linear(blk.norm_q(xq + pq), a.q.weight) + a.q_bias
    k = F.linear(blk.norm_k(xkv + pkv), a.k.weight)
    v = F.linear(blk.norm_v(xkv), a.v.weight) + a.v_bias
    heads = lambda x: x.reshape(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
    attn = a.proj((w @ heads(v)).transpose(1, 2).reshape(2, 3, 16))
    x = blk.norm2(xq + blk.gamma_1 * attn)
    expected = x + blk.gamma_2 * blk.mlp(x)
    torch.testing.assert_close(blk(xq, xkv, pq, pkv), expected, rtol=1e-5, atol=1e-5)


def test_regressor_updates_only_queries_and_uses_cae_tables() -> None:
    r, m = build("model.sincos_layout=cae")
    reg = m.regressor
    torch.testing.assert_close(reg.pos_embed, cae_sincos_pos_embed(64, (8, 8), cls_token=False))
    torch.testing.assert_close(m.encoder.vit.pos_embed[0], cae_sincos_pos_embed(96, (8, 8)))
    batch = prepare_batch(synthetic_batch(r), CPU, torch.float32)
    mask = batch["mask"]
    z = torch.randn(4, 1 + int((~mask[0]).sum()), 64)
    out = reg(z, mask, return_hidden=True)
    assert torch.equal(out.visible, z[:, 1:]) and torch.equal(out.cls, z[:, :1])
    q = reg.mask_token.expand(4, int(mask[0].sum()), -1)
    ids_m = torch.stack([torch.nonzero(row).flatten() for row in mask])
    ids_v = torch.stack([torch.nonzero(~row).flatten() for row in mask])
    pos_m, pos_v = reg.pos_embed[ids_m], reg.pos_embed[ids_v]
    for i, blk in enumerate(reg.blocks):  # keys / values re-formed from the current queries
        q = blk(q, torch.cat([z[:, 1:], q], 1), pos_m, torch.cat([pos_v, pos_m], 1))
        torch.testing.assert_close(out.hidden[i + 1], q)
    torch.testing.assert_close(out.masked, q)


def repeated_masks(batch: dict, r, repeats: int) -> dict:
    """``mask.repeats`` masks per view: ``[B * R, N]`` from the recipe's own generator."""
    import numpy as np

    from mimscale.masking import build_mask_generator

    gen = build_mask_generator(r.mask, (8, 8), 32, 4)
    rng = np.random.default_rng(0)
    n = batch["views"][0].shape[0] * repeats
    return {**batch, "mask": torch.from_numpy(np.stack([gen(rng) for _ in range(n)]))}


def test_amortised_teacher_equals_running_the_teacher_twice() -> None:
    r, m = build("mask.repeats=2")
    provider = build_target_provider(r, CPU)
    raw = repeated_masks(synthetic_batch(r), r, 2)  # 4 views x 2 masks, as collate draws them
    once = prepare_batch(raw, CPU, torch.float32)
    loss_once = m(once, once["mask"], provider(once)).loss
    twice = prepare_batch({**raw, "views": [raw["views"][0].repeat_interleave(2, 0)]}, CPU, torch.float32)
    loss_twice = m(twice, twice["mask"], provider(twice)).loss  # the teacher runs on 8 views
    torch.testing.assert_close(loss_once, loss_twice)


def test_mto_stack_is_the_regressor_on_the_grid() -> None:
    r, m = build()
    m.return_stack_hidden = True
    batch = prepare_batch(synthetic_batch(r), CPU, torch.float32)
    mask = batch["mask"]
    out = m(batch, mask, build_target_provider(r, CPU)(batch))
    hidden = out.aux["stack_hidden"]
    assert len(hidden) == m.cfg.regressor_depth + 1 and out.aux["stack_mask"] is mask
    assert hidden[0].shape == (4, 64, 64)
    torch.testing.assert_close(hidden[0][mask], m.regressor.mask_token[0, 0].expand(int(mask.sum()), -1))
    torch.testing.assert_close(hidden[-1][~mask], hidden[0][~mask])  # visible latents fixed


def test_recipe_checks_name_the_key() -> None:
    with pytest.raises(RecipeError, match=r"cae_v2\.supervise"):
        build("cae_v2.supervise=[]")
    with pytest.raises(RecipeError, match=r"cae_v2\.regressor_dim"):
        build("cae_v2.regressor_dim=30")
    with pytest.raises(RecipeError, match=r"mask\.kind"):
        build("mask.kind=none")


@pytest.mark.parametrize("name", ["t16", "s16", "b16", "l16", "h14"])
def test_size_recipes_follow_section_2_7(name: str) -> None:
    plain = load_recipe(REPO / f"recipes/cae_v2/vit_{name}.yaml")
    plus = load_recipe(REPO / f"recipes/cae_v2/vit_{name}_plus.yaml")
    assert plain.method_cfg.supervise == ["cls", "visible"]
    assert plus.method_cfg.supervise == ["cls", "visible", "masked"]
    expected = {
        "t16": (30, 96, 1),
        "s16": (49, 384, 1),
        "b16": (98, None, 4),
        "l16": (98, 1024, 4),
        "h14": (128, 1280, 4),
    }[name]
    c = plus.method_cfg
    assert (plus.mask.num_masked, c.regressor_dim, c.regressor_depth) == expected
    assert plus.optim.lr == 1.5e-3 and plus.optim.clip_grad == 3.0 and plus.mask.kind == "block"
    assert plus.teacher.model == "ViT-B-16" and plus.teacher.proj
