"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

docs/methods.md §1.4. The encoder sees every patch, masked ones replaced by a learned mask token
(BEiT-style ViT: q/v bias, layer-scale 0.1, shared relative position bias, no absolute pos);
a linear head (1x1 conv + PixelShuffle) predicts pixels; the loss is L1 on masked pixels of the
ImageNet-normalised input. Masks come from the batch (32-px mask patches, ratio 0.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import RecipeError
from mimscale.methods.base import Method, MethodOutput, Reconstruction
from mimscale.models.flops import block_flops
from mimscale.models.vit import ViTEncoder

if TYPE_CHECKING:
    from mimscale.config import Recipe


def masked_l1_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """SimMIM's reconstruction loss, in fp32 (docs/methods.md §1.4, §6.6).

    Args:
        pred: ``[B, C, H, W]`` reconstruction.
        images: ``[B, C, H, W]`` ImageNet-normalised input (the target; no per-patch norm).
        mask: bool ``[B, N]``, True = masked, N = (H / p) * (W / p) in raster order.
        patch_size: p; the token mask is upsampled to pixels by repeating it p x p.

    Returns:
        Scalar: |pred - x| summed over masked pixels and channels, divided by
        (#masked pixels + 1e-5) and by C.
    """
    b, c, hh, ww = images.shape
    m = mask.reshape(b, hh // patch_size, ww // patch_size).float()
    m = m.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)  # [B,1,H,W]
    err = F.l1_loss(pred.float(), images.float(), reduction="none")  # [B, C, H, W]
    return (err * m).sum() / (m.sum() + 1e-5) / c


class SimMIM(Method):
    """SimMIM with a mask-token encoder (``self.encoder``) and a linear pixel head (``self.decoder``).

    Args:
        recipe: the validated recipe; SimMIM's ViT-B uses ``model.arch: beit``,
            ``model.abs_pos: none``, ``model.rel_pos_bias: shared``, ``model.layer_scale: 0.1``,
            ``model.drop_path: 0.1`` (SimMIM ``configs/vit_base__800ep``).
    """

    @dataclass
    class Config:
        """The ``simmim:`` recipe section. SimMIM has no keys beyond ``model`` and ``mask``."""

    feeds_mask_tokens: ClassVar[bool] = True  # the encoder carries the mask tokens (MTO host)
    needs_equal_mask_count: ClassVar[bool] = False  # all tokens stay; counts may differ
    reconstructs_pixels: ClassVar[bool] = True

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.encoder = ViTEncoder(recipe.model, mask_token=True)
        p, d = self.encoder.patch_size, self.encoder.embed_dim
        # Key names as SimMIM's checkpoints: decoder.0 is the 1x1 conv.
        self.decoder = nn.Sequential(nn.Conv2d(d, p * p * 3, kernel_size=1), nn.PixelShuffle(p))

    def flops_per_image(self) -> float:
        """Forward FLOPs per image (every token goes through the encoder), for MFU."""
        enc = self.encoder
        return enc.depth * block_flops(enc.num_patches + 1, enc.embed_dim)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Reject recipes SimMIM cannot run, naming the key."""
        if recipe.mask.kind == "none":
            raise RecipeError(".mask.kind: SimMIM reconstructs masked pixels; 'none' masks nothing")

    def forward(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> MethodOutput:
        """One SimMIM step.

        Args:
            batch: ``batch["images"][0]`` is float ``[B, 3, H, W]``, ImageNet-normalised.
            mask: bool ``[B, N]``, True = masked.
            targets: unused (SimMIM reconstructs its own input).

        Returns:
            ``MethodOutput(loss, {"loss_pix": ...}, aux)``; ``aux`` holds the encoder's hidden
            states when ``return_stack_hidden`` is set.
        """
        images = batch["images"][0]
        pred, enc = self._predict(images, mask)
        loss = masked_l1_loss(pred, images, mask, self.encoder.patch_size)
        aux: dict[str, Any] = {}
        if self.return_stack_hidden:
            aux = {"stack_hidden": [s[:, 1:] for s in enc.hidden], "stack_mask": mask}
        return self.finish(MethodOutput(loss, {"loss_pix": loss.detach()}, aux))

    def _predict(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The pixels ``[B, 3, H, W]`` (and the encoder's output) for ``images`` under ``mask``."""
        layers = range(self.encoder.depth + 1) if self.return_stack_hidden else ()
        enc = self.encoder(images, mask, mode="mask_token", return_layers=layers)
        z = enc.x[:, 1:]  # [B, N, D], cls dropped
        h, w = self.encoder.grid
        z = z.transpose(1, 2).reshape(z.shape[0], -1, h, w)  # [B, D, h, w]
        return self.decoder(z), enc

    def reconstruct(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> Reconstruction:
        """The 1x1-conv head's pixels for ``batch`` under ``mask`` (SimMIM predicts raw pixels)."""
        images = batch["images"][0]
        return Reconstruction(images, mask, self._predict(images, mask)[0].float())
