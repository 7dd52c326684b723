"""LC-MAE (docs/methods.md §3): the loss pieces against hand values and an independent recomputation,
the disjoint second mask, the momentum schedule and the fp32 momentum copy, recipe checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mimscale.config import RecipeError
from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import prepare_batch, seed_everything
from mimscale.masking import disjoint_mask
from mimscale.methods import METHODS, build_method
from mimscale.methods.common import patchify, pixel_mse_loss
from mimscale.methods.lc_mae import LCMAE, guidance_loss
from mimscale.models.ema import MomentumCopy, cosine_momentum
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes/lc_mae/cpu_tiny.yaml"


def tiny(*overrides: str):
    r = load_recipe(TINY, ["train.micro_batch=6", "train.global_batch=6", *overrides])
    seed_everything(0)
    method = build_method(r)
    batch = prepare_batch(synthetic_batch(r, seed=3), torch.device("cpu"), torch.float32)
    return r, method, batch


def test_registry_and_flags() -> None:
    assert METHODS["lc_mae"] is LCMAE and LCMAE.num_views == 2 and LCMAE.needs_equal_mask_count


def test_guidance_loss_hand_values() -> None:
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    k = torch.tensor([[0.0, 5.0], [1.0, 0.0], [2.0, 0.0]])
    # 2 - 2 cos: orthogonal -> 2; 45 degrees -> 2 - sqrt(2); parallel (any norms) -> 0
    expect = (2.0 + (2.0 - math.sqrt(2.0)) + 0.0) / 3
    assert guidance_loss(q, k).item() == pytest.approx(expect, rel=1e-6)
    assert guidance_loss(q, -q).item() == pytest.approx(4.0)


def test_disjoint_mask_hand_example_and_distribution() -> None:
    mask = torch.tensor([[False, False, True, True, True, True]])  # |V| = 2
    noise = torch.tensor([[0.0, 0.1, 0.9, 0.3, 0.5, 0.2]])
    # view 2 keeps the two masked patches with the smallest noise: 5 (0.2) and 3 (0.3)
    assert disjoint_mask(mask, noise).tolist() == [[True, True, True, False, True, False]]
    g = torch.Generator().manual_seed(0)
    n, b = 16, 4000
    m1 = torch.rand(b, n, generator=g).argsort(1).argsort(1) >= 4  # 4 visible, 12 masked
    m2 = disjoint_mask(m1, torch.rand(b, n, generator=g))
    assert ((~m2).sum(1) == 4).all() and not (~m1 & ~m2).any()  # same |V|, disjoint visible sets
    # each masked patch of view 1 is visible in view 2 with probability 4 / 12 (official shuffle)
    freq = (~m2).float().sum() / m1.float().sum()
    assert freq.item() == pytest.approx(4 / 12, abs=0.01)


def test_second_mask_comes_from_the_batch_noise() -> None:
    _, method, batch = tiny()
    mask, noise = batch["mask"], batch["mask_noise"]
    m2 = method.second_mask(mask, noise)
    torch.rand(100)  # the global RNG plays no part
    assert torch.equal(method.second_mask(mask.clone(), noise.clone()), m2)
    assert torch.equal(m2, disjoint_mask(mask, noise))
    assert ((~m2).sum(1) == (~mask).sum(1)).all() and not (~mask & ~m2).any()
    assert not torch.equal(method.second_mask(mask, noise.roll(1, dims=0)), m2)  # the noise decides
    out = method(batch, mask)
    torch.rand(100)
    assert torch.equal(method(batch, mask).loss, out.loss)
    with pytest.raises(ValueError, match="mask_noise"):
        method({k: v for k, v in batch.items() if k != "mask_noise"}, mask)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(250, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_momentum(70, None, 0.996) == 0.996


def test_momentum_copy_update_formula_dtype_and_state() -> None:
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = MomentumCopy({"net": src})
    before = {k: v.clone() for k, v in ema["net"].state_dict().items()}
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    src.train()(torch.randn(8, 3))  # moves the BN running stats and num_batches_tracked
    ema.update({"net": src}, 0.9)
    after, cur = ema["net"].state_dict(), src.state_dict()
    for k in before:
        if before[k].is_floating_point():
            assert torch.allclose(after[k], 0.9 * before[k] + 0.1 * cur[k], atol=1e-7), k
        else:
            assert torch.equal(after[k], cur[k]), k  # integer buffers are copied
    # fp32 and eval whatever happens to the host module; carried by state_dict as extra state
    host = torch.nn.Module()
    host.src, host.ema = src, ema
    host.bfloat16().train()
    assert ema["net"][0].weight.dtype == torch.float32 and not ema["net"].training
    assert not any(p is q for p in host.parameters() for q in ema["net"].parameters())
    sd = host.state_dict()
    other = MomentumCopy({"net": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))})
    other.set_extra_state(sd["ema._extra_state"])
    assert other.num_updates == 1
    restored = other["net"].state_dict()
    assert all(torch.equal(restored[k], after[k]) for k in after)


def recompute(method: LCMAE, batch: dict, mask: torch.Tensor, mask2: torch.Tensor | None) -> torch.Tensor:
    """LC-MAE's loss from the pieces, one view at a time, explicit cosines (no shared code paths
    beyond the modules themselves and MAE's tested pixel loss)."""
    x1, x2 = batch["images"]
    enc, cfg = method.encoder, method.cfg

    def q(x, m):
        lat = enc(x, m, mode="visible").x
        return method.predictor(method.projector(lat[:, 1:].mean(1))), lat

    def k(x):
        t = method.momentum_model
        with torch.no_grad():
            return t["projector"](t["encoder"](x, mode="all").x[:, 1:].mean(1))

    def cos_loss(a, b):
        cos = [torch.dot(u, v) / (u.norm() * v.norm()) for u, v in zip(a, b, strict=True)]
        return torch.stack([2 - 2 * c for c in cos]).mean()

    q1, lat1 = q(x1, mask)
    pix = pixel_mse_loss(method.decoder(lat1, mask).pred, patchify(x1, enc.patch_size), mask, cfg.norm_pix)
    if mask2 is None:
        return pix + cfg.alpha * cos_loss(q1, k(x2))
    q2, _ = q(x2, mask2)
    return pix + cfg.alpha * 0.5 * (cos_loss(q1, k(x2)) + cos_loss(q2, k(x1)))


@pytest.mark.parametrize("cross_view", [True, False])
def test_loss_pieces_match_an_independent_recomputation(cross_view: bool) -> None:
    r, method, batch = tiny(f"lc_mae.cross_view={str(cross_view).lower()}")
    mask = batch["mask"]
    # Make the momentum model differ from the student so the pairing matters.
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = method(batch, mask)
    mask2 = method.second_mask(mask, batch["mask_noise"]) if cross_view else None
    ref = recompute(method, batch, mask, mask2)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(
        (out.metrics["loss_pix"] + r.method_cfg.alpha * out.metrics["loss_guidance"]).item(), rel=1e-6
    )
    assert 0.0 <= out.metrics["loss_guidance"].item() <= 4.0


def test_momentum_model_is_a_running_stats_copy_without_gradients() -> None:
    _, method, batch = tiny()
    x = batch["images"][1]
    k_all = method.momentum_targets(x)
    k_one = method.momentum_targets(x[:1])
    assert torch.allclose(k_all[:1], k_one, atol=1e-5)  # eval-mode BN: no batch statistics
    out = method(batch, batch["mask"])
    out.loss.backward()
    assert all(p.grad is None for p in method.momentum_model["encoder"].parameters())
    assert method.projector[0].weight.grad is not None and method.predictor[0].weight.grad is not None


def test_after_step_follows_the_schedule() -> None:
    _, method, batch = tiny()
    method.set_total_steps(10)
    method.train()(batch, batch["mask"])  # moves the BN running stats
    xi = {k: v.clone() for k, v in method.momentum_model["projector"].state_dict().items()}
    theta = method.projector.state_dict()
    method.after_step(4)  # the 4th optimizer step -> tau(3)
    tau = cosine_momentum(3, 10, 0.996)
    for k, v in method.momentum_model["projector"].state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, tau * xi[k] + (1 - tau) * theta[k], atol=1e-7), k
    assert method.momentum_model.num_updates == 1
    assert method(batch, batch["mask"]).metrics["momentum"].item() == pytest.approx(
        cosine_momentum(1, 10, 0.996)
    )


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.zero_stage=3", r"train\.zero_stage: LC-MAE keeps a whole fp32 momentum copy"),
        ("mask.ratio=0.4", r"mask\.ratio: the two disjoint visible sets"),
        ("mask.kind=block", r"mask\.kind: LC-MAE needs 'random'"),
        ("lc_mae.momentum=1.5", r"lc_mae\.momentum"),
    ],
)
def test_recipe_checks(override: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        load_recipe(TINY, [override])


def test_one_view_is_refused(tmp_path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(f"_base_: {TINY}\ndata: {{views: [{{size: 32, crop: simple}}]}}\n")
    with pytest.raises(RecipeError, match=r"data\.views: LC-MAE needs 2 views, got 1"):
        load_recipe(p)
