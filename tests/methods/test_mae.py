"""MAE: patchify layout, the loss against hand values and explicit loops, decoder, recipe checks."""

import pytest
import torch

from mimscale.config import MaskConfig, ModelConfig, Recipe, RecipeError
from mimscale.methods import METHODS
from mimscale.methods.common import patchify, pixel_mse_loss, unpatchify
from mimscale.methods.mae import MAE


def tiny_mae(norm_pix: bool = True) -> MAE:
    r = Recipe(method="mae")
    r.model = ModelConfig(size="tiny", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
    r.method_cfg = MAE.Config(norm_pix=norm_pix, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    return MAE(r)


def random_mask(b: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(b, n, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(b, n, dtype=torch.bool).scatter_(1, ids, True)


def test_registry():
    assert METHODS["mae"] is MAE and MAE.needs_equal_mask_count and MAE.feeds_mask_tokens


def test_patchify_order_and_round_trip():
    x = torch.randn(2, 3, 8, 12)
    p = 4
    patches = patchify(x, p)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2) = raster index 1 * 3 + 2; inside it, values run (p, q, c).
    expect = [x[1, c, 4 + i, 8 + j] for i in range(p) for j in range(p) for c in range(3)]
    assert torch.equal(patches[1, 5], torch.stack(expect))
    assert torch.equal(unpatchify(patches, p, (2, 3)), x)


def test_loss_hand_values():
    # p = 1: two patches of 3 values; patch 0 = (1, 2, 3) is masked, patch 1 is visible.
    images = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 5.0]]).reshape(1, 3, 1, 2)
    target, pred = patchify(images, 1), torch.zeros(1, 2, 3)
    mask = torch.tensor([[True, False]])
    assert pixel_mse_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(14 / 3)
    # norm-pix: mean 2, unbiased var 1 -> target (-1, 0, 1) / sqrt(1 + 1e-6); mse = (2/3) / (1 + 1e-6)
    assert pixel_mse_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(2 / 3 / (1 + 1e-6))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_explicit_loops(norm_pix):
    torch.manual_seed(0)
    b, p, g = 2, 2, 3
    images, pred = torch.randn(b, 3, p * g, p * g), torch.randn(b, g * g, p * p * 3)
    mask = random_mask(b, g * g, 5)
    total, count = 0.0, 0
    for s in range(b):
        for i in range(g * g):
            if not mask[s, i]:
                continue
            r, c = divmod(i, g)
            t = images[s, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                mu = t.sum() / t.numel()
                var = ((t - mu) ** 2).sum() / (t.numel() - 1)
                t = (t - mu) / (var + 1e-6).sqrt()
            total += ((pred[s, i].double() - t) ** 2).mean().item()
            count += 1
    got = pixel_mse_loss(pred, patchify(images, p), mask, norm_pix)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(total / count, rel=1e-5)


def test_loss_is_fp32_under_low_precision_inputs():
    pred, target, mask = (
        torch.randn(2, 4, 12).bfloat16(),
        torch.randn(2, 4, 12).bfloat16(),
        random_mask(2, 4, 2),
    )
    assert pixel_mse_loss(pred, target, mask).dtype == torch.float32


def test_forward_uses_only_visible_patches_and_all_params_get_grads():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 64, 48)
    out = model({"images": [x]}, mask)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and set(out.metrics) == {"loss_pix"}
    assert dict(out.aux) == {}
    out.loss.backward()
    for name, prm in model.named_parameters():
        assert (prm.grad is not None) == prm.requires_grad, name
    assert not model.encoder.vit.pos_embed.requires_grad and not model.decoder.pos_embed.requires_grad
    # Changing masked pixels changes the target but not the prediction.
    pix = mask.reshape(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    y = torch.where(pix, torch.randn_like(x), x)
    with torch.no_grad():
        latent_x = model.encoder(x, mask, mode="visible").x
        latent_y = model.encoder(y, mask, mode="visible").x
    assert torch.allclose(latent_x, latent_y)


def test_decoder_sequence_equals_mae_unshuffle_and_stack_hidden():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    model.return_stack_hidden = True
    x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 64, 48)
    out = model({"images": [x]}, mask)
    hidden, stack_mask = out.aux["stack_hidden"], out.aux["stack_mask"]
    assert len(hidden) == 3 and all(h.shape == (2, 64, 32) for h in hidden)
    assert torch.equal(stack_mask, mask)
    # MAE's own formulation: append mask tokens, unshuffle with ids_restore, add decoder pos.
    dec = model.decoder
    with torch.no_grad():
        latent = dec.embed(model.encoder(x, mask, mode="visible").x)
        ids_shuffle = torch.argsort(mask.int(), dim=1, stable=True)  # visible first, then masked
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        seq = torch.cat([latent[:, 1:], dec.mask_token.expand(2, 48, -1)], dim=1)
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 32))
        seq = torch.cat([latent[:, :1], seq], dim=1) + dec.pos_embed
        h1 = dec.blocks[0](seq)
    assert torch.allclose(hidden[0], seq[:, 1:], atol=1e-6)
    assert torch.allclose(hidden[1], h1[:, 1:], atol=1e-5)


def test_unequal_masked_counts_error():
    mask = random_mask(2, 64, 48)
    mask[0] = True
    with pytest.raises(ValueError, match="same number of masked patches"):
        tiny_mae()({"images": [torch.randn(2, 3, 32, 32)]}, mask)


def test_check_recipe_names_the_key():
    with pytest.raises(RecipeError, match=r"\.mask\.kind"):
        MAE.check_recipe(Recipe(mask=MaskConfig(kind="none"), method_cfg=MAE.Config()))
    with pytest.raises(RecipeError, match=r"\.model\.rel_pos_bias"):
        beit = ModelConfig(arch="beit", rel_pos_bias="shared")
        MAE.check_recipe(Recipe(model=beit, method_cfg=MAE.Config()))
    bad = Recipe(method_cfg=MAE.Config(decoder_dim=30, decoder_heads=4))
    with pytest.raises(RecipeError, match=r"\.mae\.decoder_dim"):
        MAE.check_recipe(bad)
    MAE.check_recipe(Recipe(method_cfg=MAE.Config()))


def test_group_matcher_and_checkpointing_on_method():
    model = tiny_mae()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    x, mask = torch.randn(2, 3, 32, 32), random_mask(2, 64, 48)
    model({"images": [x]}, mask).loss.backward()
    m = model.group_matcher()
    assert m["stem"].startswith("^encoder\\.")
