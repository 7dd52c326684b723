"""SimMIM: the masked L1 loss against hand values and explicit loops, the forward, recipe checks."""

import pytest
import torch

from mimscale.config import MaskConfig, ModelConfig, Recipe, RecipeError
from mimscale.methods import METHODS
from mimscale.methods.simmim import SimMIM, masked_l1_loss


def tiny_simmim() -> SimMIM:
    r = Recipe(method="simmim")
    r.model = ModelConfig(
        size="tiny", img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4,
        arch="beit", abs_pos="none", rel_pos_bias="shared", layer_scale=0.1,
    )  # fmt: skip
    r.method_cfg = SimMIM.Config()
    return SimMIM(r)


def test_registry():
    assert METHODS["simmim"] is SimMIM and SimMIM.feeds_mask_tokens


def test_loss_hand_values():
    # p = 1, a 1x2 image: pixel 0 masked, pixel 1 visible; prediction 0.
    images = torch.tensor([[1.0, 7.0], [-2.0, 7.0], [3.0, 7.0]]).reshape(1, 3, 1, 2)
    mask = torch.tensor([[True, False]])
    got = masked_l1_loss(torch.zeros_like(images), images, mask, patch_size=1)
    assert got.item() == pytest.approx((1 + 2 + 3) / (1 + 1e-5) / 3)


def test_loss_matches_explicit_loops():
    torch.manual_seed(0)
    b, p, g = 2, 2, 3
    images, pred = torch.randn(b, 3, p * g, p * g), torch.randn(b, 3, p * g, p * g)
    mask = torch.rand(b, g * g) < 0.5
    total, pixels = 0.0, 0
    for s in range(b):
        for y in range(p * g):
            for x in range(p * g):
                if mask[s, (y // p) * g + x // p]:
                    total += (pred[s, :, y, x] - images[s, :, y, x]).abs().sum().item()
                    pixels += 1
    got = masked_l1_loss(pred, images, mask, p)
    assert got.item() == pytest.approx(total / (pixels + 1e-5) / 3, rel=1e-5)


def test_forward_grads_invariance_and_unequal_counts():
    torch.manual_seed(0)
    model = tiny_simmim().eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64) < 0.6  # counts differ per sample: fine with mask tokens
    out = model({"images": [x]}, mask)
    assert torch.isfinite(out.loss) and set(out.metrics) == {"loss_pix"} and dict(out.aux) == {}
    out.loss.backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None, name
    # Masked patches are replaced by the mask token: their pixels cannot reach the prediction.
    pix = mask.reshape(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    y = torch.where(pix, torch.randn_like(x), x)
    with torch.no_grad():
        za = model.encoder(x, mask, mode="mask_token").x
        zb = model.encoder(y, mask, mode="mask_token").x
    assert torch.allclose(za, zb, atol=1e-6)


def test_head_is_conv_pixelshuffle_and_loss_uses_it():
    model = tiny_simmim().eval()
    x, mask = torch.randn(1, 3, 32, 32), torch.rand(1, 64) < 0.5
    with torch.no_grad():
        z = model.encoder(x, mask, mode="mask_token").x[:, 1:]  # [1, 64, 64]
        pred = model.decoder(z.transpose(1, 2).reshape(1, 64, 8, 8))
        # PixelShuffle: conv channel c*p*p + i*p + j of token (r, q) is pixel (c, 4r + i, 4q + j).
        conv = model.decoder[0](z.transpose(1, 2).reshape(1, 64, 8, 8))
        assert torch.equal(pred[0, 2, 4 * 3 + 1, 4 * 5 + 2], conv[0, 2 * 16 + 1 * 4 + 2, 3, 5])
        assert model({"images": [x]}, mask).loss.item() == pytest.approx(
            masked_l1_loss(pred, x, mask, 4).item()
        )


def test_stack_hidden_are_encoder_layers_without_cls():
    model = tiny_simmim().eval()
    model.return_stack_hidden = True
    x, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.6
    out = model({"images": [x]}, mask)
    hidden = out.aux["stack_hidden"]
    assert len(hidden) == 4 and all(h.shape == (2, 64, 64) for h in hidden)
    assert torch.equal(out.aux["stack_mask"], mask)
    ref = model.encoder(x, mask, mode="mask_token", return_layers=[0, 3]).hidden
    assert torch.allclose(hidden[0], ref[0][:, 1:]) and torch.allclose(hidden[3], ref[1][:, 1:])
    # layer 0: every masked row is the mask token (no abs pos in SimMIM).
    assert torch.allclose(hidden[0][mask], model.encoder.mask_token[0].expand(int(mask.sum()), -1))


def test_check_recipe_names_the_key():
    with pytest.raises(RecipeError, match=r"\.mask\.kind"):
        SimMIM.check_recipe(Recipe(method="simmim", mask=MaskConfig(kind="none")))
    SimMIM.check_recipe(Recipe(method="simmim", mask=MaskConfig(kind="random_coarse", ratio=0.6)))
