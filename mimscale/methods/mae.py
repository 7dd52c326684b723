"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

docs/methods.md §1.3. The encoder sees the visible patches only; a light decoder (8 x 512, 16 heads)
inserts mask tokens and predicts the pixels of every patch; the loss is the per-patch
normalised pixel MSE averaged over masked patches. Masks come from the batch (random, 0.75).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mimscale.config import RecipeError
from mimscale.methods.base import Method, MethodOutput, Reconstruction
from mimscale.methods.common import patchify, pixel_mse_loss, predicted_image
from mimscale.models.decoders import MAEDecoder
from mimscale.models.flops import block_flops
from mimscale.models.vit import ViTEncoder

if TYPE_CHECKING:
    from mimscale.config import Recipe


class MAE(Method):
    """MAE with a timm ViT encoder (``self.encoder``) and :class:`MAEDecoder` (``self.decoder``).

    Args:
        recipe: the validated recipe; ``recipe.model`` sizes the encoder and ``recipe.method_cfg``
            (:class:`MAE.Config`) the decoder and the loss.
    """

    @dataclass
    class Config:
        """The ``mae:`` recipe section (defaults: MAE ViT-B/L/H pre-training)."""

        norm_pix: bool = True  # per-patch normalised pixel target (--norm_pix_loss)
        decoder_dim: int = 512
        decoder_depth: int = 8
        decoder_heads: int = 16

    feeds_mask_tokens: ClassVar[bool] = True  # the decoder carries the mask tokens (MTO host)
    needs_equal_mask_count: ClassVar[bool] = True  # visible tokens are gathered to [B, |V|, D]
    reconstructs_pixels: ClassVar[bool] = True

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        cfg: MAE.Config = MAE.config_of(recipe)
        self.cfg = cfg
        self.encoder = ViTEncoder(recipe.model)
        self.mask_ratio = recipe.mask.ratio  # for flops_per_image only
        p = self.encoder.patch_size
        self.decoder = MAEDecoder(
            self.encoder.embed_dim,
            self.encoder.grid,
            out_dim=p * p * 3,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
        )

    def flops_per_image(self) -> float:
        """Forward FLOPs per image (encoder on visible + cls, decoder on all tokens), for MFU."""
        enc = self.encoder
        n_vis = enc.num_patches - round(enc.num_patches * self.mask_ratio)
        return enc.depth * block_flops(n_vis + 1, enc.embed_dim) + self.cfg.decoder_depth * block_flops(
            enc.num_patches + 1, self.cfg.decoder_dim
        )

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Reject recipes MAE cannot run, naming the key."""
        if recipe.mask.kind == "none":
            raise RecipeError(".mask.kind: MAE reconstructs masked patches; 'none' masks nothing")
        if recipe.model.rel_pos_bias != "none":
            raise RecipeError(".model.rel_pos_bias: MAE encodes visible tokens only; use 'none'")
        cfg = cls.config_of(recipe)
        if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % 4:
            raise RecipeError(
                f".mae.decoder_dim: {cfg.decoder_dim} must be a multiple of 4 and of "
                f"mae.decoder_heads={cfg.decoder_heads}"
            )

    def forward(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> MethodOutput:
        """One MAE step.

        Args:
            batch: ``batch["images"][0]`` is float ``[B, 3, H, W]``, ImageNet-normalised.
            mask: bool ``[B, N]``, True = masked, the same count in every sample.
            targets: unused (MAE reconstructs its own input).

        Returns:
            ``MethodOutput(loss, {"loss_pix": ...}, aux)``; ``aux`` holds the decoder's hidden
            states when ``return_stack_hidden`` is set.
        """
        images = batch["images"][0]
        dec = self._decode(images, mask)
        target = patchify(images, self.encoder.patch_size)  # [B, N, p*p*3]
        loss = pixel_mse_loss(dec.pred, target, mask, self.cfg.norm_pix)
        aux: dict[str, Any] = {}
        if self.return_stack_hidden:
            aux = {"stack_hidden": [h[:, 1:] for h in dec.hidden], "stack_mask": mask}
        return self.finish(MethodOutput(loss, {"loss_pix": loss.detach()}, aux))

    def _decode(self, images: torch.Tensor, mask: torch.Tensor) -> Any:
        """Encoder on the visible patches, then the decoder over all of them."""
        latent = self.encoder(images, mask, mode="visible").x  # [B, 1 + |V|, D]
        return self.decoder(latent, mask, return_hidden=self.return_stack_hidden)

    def reconstruct(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> Reconstruction:
        """The decoder's pixels for ``batch`` under ``mask`` (norm-pix mapped back per patch)."""
        images = batch["images"][0]
        pred = self._decode(images, mask).pred
        p = self.encoder.patch_size
        return Reconstruction(
            images, mask, predicted_image(pred, images, p, self.encoder.grid, self.cfg.norm_pix)
        )
