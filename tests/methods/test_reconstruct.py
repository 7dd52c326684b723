"""Method.reconstruct: the pictures show what the loss is computed on.

For every pixel method the reconstruction, mapped back to the loss's own units, reproduces the
forward pass's ``loss_pix`` (an independent formulation of the same number); norm-pix's inverse
is checked by hand; methods without pixels say so.
"""

from __future__ import annotations

import pytest
import torch
from tiny_methods import tiny_method

from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import build_target_provider, prepare_batch
from mimscale.methods import METHODS
from mimscale.methods.common import patch_stats, patchify, predicted_image
from mimscale.methods.simmim import masked_l1_loss

CPU = torch.device("cpu")
PIXEL_METHODS = ["mae", "simmim", "lc_mae", "mr_mae"]


def test_predicted_image_inverts_norm_pix_by_hand() -> None:
    """Patch values 0..11 (mean 5.5, unbiased std sqrt(13)): a prediction of (v - 5.5) / std maps
    back to v exactly; without norm-pix the prediction is the image."""
    images = torch.arange(12.0).view(1, 3, 2, 2)  # one 2x2 patch, 3 channels
    target = patchify(images, 2)  # [1, 1, 12], values 0..11 in (p, q, c) order
    std = (13.0 + 1e-6) ** 0.5  # var of 0..11, unbiased: 13
    pred = (target - 5.5) / std
    assert torch.allclose(predicted_image(pred, images, 2, (1, 1), True), images, atol=1e-5)
    assert torch.equal(predicted_image(target, images, 2, (1, 1), False), images)
    mean, s = patch_stats(target)
    assert mean.item() == pytest.approx(5.5) and s.item() == pytest.approx(std)


@pytest.mark.parametrize("name", PIXEL_METHODS)
def test_reconstruction_reproduces_the_pixel_loss(name: str) -> None:
    r, method = tiny_method(name)
    method.eval()
    batch = prepare_batch(synthetic_batch(r, seed=3), CPU, torch.float32)
    provider = build_target_provider(r, CPU)
    targets = provider(batch) if provider is not None else None
    with torch.no_grad():
        torch.manual_seed(7)  # MR-MAE's focused mask draws: the same draws in both passes
        out = method(batch, batch["mask"], targets)
        torch.manual_seed(7)
        rec = method.reconstruct(batch, batch["mask"], targets)
    x = batch["images"][0]
    assert rec.images.shape == rec.pred.shape == x.shape and rec.mask.shape == batch["mask"].shape
    assert torch.equal(rec.images, x)
    p = method.encoder.patch_size
    if name == "simmim":
        again = masked_l1_loss(rec.pred, x, rec.mask, p)
    else:  # the loss in norm-pix units, from the picture: ((picture - mean) / std - target)^2
        target = patchify(x, p)
        mean, std = patch_stats(target)
        per_patch = (((patchify(rec.pred, p) - target) / std) ** 2).mean(-1)
        again = (per_patch * rec.mask).sum() / rec.mask.sum()
    assert again.item() == pytest.approx(out.metrics["loss_pix"].item(), rel=1e-4)
    # the same number of masked patches per sample (MR-MAE's focused mask moves them, and the
    # loss above matching says rec.mask is the one the step used)
    assert rec.mask.sum(1).tolist() == batch["mask"].sum(1).tolist()


def test_methods_without_pixels_say_so() -> None:
    assert not METHODS["cae_v2"].reconstructs_pixels
    assert all(METHODS[n].reconstructs_pixels for n in PIXEL_METHODS)
    r, method = tiny_method("cae_v2")
    batch = prepare_batch(synthetic_batch(r), CPU, torch.float32)
    with pytest.raises(NotImplementedError, match="does not reconstruct pixels"):
        method.reconstruct(batch, batch["mask"])
