"""LC-MAE: Longer-range Contextualized Masked Autoencoder (official code name "LUT", ECCV'24).

docs/methods.md §3. MAE plus a BYOL-style global guidance loss: the mean of the online encoder's
*visible* patch tokens, through projector + predictor, must match (2 - 2 cos) the mean patch
token of a momentum encoder + projector that sees the *whole* image of the other view.

Default = the official code's symmetric cross-view form (§3.9 #1): both views are masked online
with disjoint visible sets, the momentum model encodes both full views, the loss pairs
(q1, k2) and (q2, k1); MAE reconstructs view 1 only. ``lc_mae.cross_view: false`` is the paper's
single pair (masked view 1 online, full view 2 in the momentum model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import RecipeError
from mimscale.masking import disjoint_mask
from mimscale.methods.base import Method, MethodOutput, Reconstruction
from mimscale.methods.common import patchify, pixel_mse_loss, predicted_image
from mimscale.models.decoders import MAEDecoder
from mimscale.models.ema import MomentumCopy, average_buffers, cosine_momentum
from mimscale.models.flops import block_flops
from mimscale.models.vit import ViTEncoder

if TYPE_CHECKING:
    from mimscale.config import Recipe


def mlp_head(dim: int, hidden: int) -> nn.Sequential:
    """LUT ``_build_mlp`` with depth 2 (§3.3): Linear(no bias) -> BN -> ReLU -> Linear(no bias).

    ``[B, dim]`` -> ``[B, dim]``; no BN or activation after the last layer. Linear weights are
    xavier-uniform: LUT builds its heads before MAE's ``initialize_weights``, whose xavier pass
    reaches them (docs/methods.md §3.3).
    """
    head = nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, dim, bias=False),
    )  # fmt: skip
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return head


def guidance_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``mean_b (2 - 2 cos(q_b, k_b))`` in fp32 (§3.2 step 7; F.normalize, eps 1e-12, §6.6).

    Args:
        q: ``[B, D]`` online predictions.
        k: ``[B, D]`` momentum targets (no gradient flows into them).

    Returns:
        Scalar in [0, 4].
    """
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.detach().float(), dim=-1)
    return (2.0 - 2.0 * (q * k).sum(dim=-1)).mean()


class LCMAE(Method):
    """LC-MAE: MAE (``encoder``, ``decoder``) + ``projector``, ``predictor`` + ``momentum_model``.

    Args:
        recipe: the validated recipe; ``recipe.method_cfg`` is :class:`LCMAE.Config`.
    """

    @dataclass
    class Config:
        """The ``lc_mae:`` recipe section (defaults: LUT ViT-B pre-training, §3.7)."""

        alpha: float = 0.25  # w_bc, the global guidance weight (§3.6: S 1.0, B 0.25)
        cross_view: bool = True  # official symmetric form; false = paper's single pair (§3.9 #1)
        norm_pix: bool = True
        decoder_dim: int = 512
        decoder_depth: int = 8
        decoder_heads: int = 16
        head_hidden: int = 4096  # projector / predictor hidden width (§3.3)
        momentum: float = 0.996  # tau_0 of the cosine schedule to 1 (§3.5)
        momentum_schedule: bool = True  # false: tau stays tau_0 (the paper's text)
        sync_bn: bool = True  # SyncBatchNorm in the heads (multi-process CUDA runs only)

    num_views: ClassVar[int] = 2
    feeds_mask_tokens: ClassVar[bool] = True  # the MAE decoder carries the mask tokens
    needs_equal_mask_count: ClassVar[bool] = True
    reconstructs_pixels: ClassVar[bool] = True

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        cfg: LCMAE.Config = LCMAE.config_of(recipe)
        self.cfg = cfg
        self.encoder = ViTEncoder(recipe.model)
        self.mask_ratio = recipe.mask.ratio  # for the FLOP counts only
        d, p = self.encoder.embed_dim, self.encoder.patch_size
        self.decoder = MAEDecoder(
            d, self.encoder.grid, p * p * 3, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads
        )
        self.projector = mlp_head(d, cfg.head_hidden)
        self.predictor = mlp_head(d, cfg.head_hidden)
        self.synced_bn = _maybe_sync_bn(self, cfg.sync_bn)
        # The EMA covers encoder + projector, the parts the target uses (§6.2); LUT also averages
        # the decoder and predictor, which never influence the loss.
        self.momentum_model = MomentumCopy({"encoder": self.encoder, "projector": self.projector})
        self.total_steps: int | None = None
        self.uses_mask_noise = cfg.cross_view  # view 2's mask: masking.disjoint_mask(mask, noise)

    def _pass_flops(self) -> tuple[float, float]:
        """Forward FLOPs per image of the gradient passes (online encoder on the visible tokens of
        each online view, decoder) and of the no-grad momentum passes (full views); heads omitted."""
        enc, cfg = self.encoder, self.cfg
        views = 2 if cfg.cross_view else 1
        n_vis = int(enc.num_patches * (1.0 - self.mask_ratio))  # RandomMask's len_keep
        online = views * enc.depth * block_flops(n_vis + 1, enc.embed_dim)
        decoder = cfg.decoder_depth * block_flops(enc.num_patches + 1, cfg.decoder_dim)
        return online + decoder, views * enc.depth * block_flops(enc.num_patches + 1, enc.embed_dim)

    def flops_per_image(self) -> float:
        """Forward FLOPs per image of every pass (for MFU)."""
        return sum(self._pass_flops())

    def train_flops_per_image(self) -> float:
        """FLOPs per image of a training step: 3x forward for the gradient passes (backward ~ 2x
        forward), 1x for the no-grad momentum passes."""
        grad, nograd = self._pass_flops()
        return 3.0 * grad + nograd

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Reject recipes LC-MAE cannot run, naming the key."""
        if recipe.train.zero_stage == 3:
            raise RecipeError(
                ".train.zero_stage: LC-MAE keeps a whole fp32 momentum copy of encoder + projector on "
                "every rank, averaged from whole parameters; ZeRO-3 partitions them, so the update "
                "would need a gather each step. Use zero_stage 0, 1 or 2."
            )
        if len(recipe.data.views) != 2:
            raise RecipeError(f".data.views: LC-MAE needs 2 views, got {len(recipe.data.views)}")
        if recipe.data.views[1].size != recipe.model.img_size:
            raise RecipeError(".data.views[1].size: the second view must have model.img_size")
        if recipe.mask.kind != "random" or recipe.mask.repeats != 1:
            raise RecipeError(".mask.kind: LC-MAE needs 'random' masks (exact count) with repeats 1")
        if recipe.mask.ratio < 0.5:
            raise RecipeError(".mask.ratio: the two disjoint visible sets need ratio >= 0.5")
        if recipe.model.rel_pos_bias != "none":
            raise RecipeError(".model.rel_pos_bias: LC-MAE encodes visible tokens only; use 'none'")
        cfg = cls.config_of(recipe)
        if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % 4:
            raise RecipeError(".lc_mae.decoder_dim: must be a multiple of 4 and of lc_mae.decoder_heads")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise RecipeError(f".lc_mae.momentum: expected 0 <= tau_0 <= 1, got {cfg.momentum}")

    def set_total_steps(self, total_steps: int) -> None:
        """The run's optimizer-step count: the horizon of the cosine momentum schedule."""
        self.total_steps = total_steps

    def momentum_at(self, i: int) -> float:
        """tau of the update after ``i`` optimizer steps (cosine tau_0 -> 1, §3.5)."""
        total = self.total_steps if self.cfg.momentum_schedule else None
        return cosine_momentum(i, total, self.cfg.momentum)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update after optimizer step ``step`` (1-based), over parameters and buffers."""
        if not self.synced_bn:
            # Per-rank BN (CPU fallback) leaves rank-specific running stats: average them so every
            # rank's momentum copy stays equal (the rank-0 checkpoint restores all ranks).
            average_buffers(self.projector)
        sources = {"encoder": self.encoder, "projector": self.projector}
        self.momentum_model.update(sources, self.momentum_at(step - 1))

    @torch.no_grad()
    def momentum_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Momentum model on full views (eval mode, running stats): ``[B', 3, H, W]`` -> ``[B', D]``."""
        self.momentum_model.to_device(images.device)
        # fp32 weights; under a bf16 engine the passes run in bf16 autocast like the student.
        low = images.dtype != torch.float32
        with torch.autocast(images.device.type, dtype=images.dtype, enabled=low):
            z = self.momentum_model["encoder"](images, mode="all").x[:, 1:].mean(dim=1)  # cls excluded
            return self.momentum_model["projector"](z).float()

    def second_mask(self, mask: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """View 2's mask from view 1's and the batch's ``mask_noise`` (data: drawn in collate per
        sample from (seed, epoch, key), so a resumed run, a test and a plug-in see the same one).

        Args:
            mask: bool ``[B, N]``, view 1's mask. noise: float ``[B, N]``, ``batch["mask_noise"]``.

        Returns:
            bool ``[B, N]``, True = masked (:func:`mimscale.masking.disjoint_mask`).
        """
        if noise is None:
            raise ValueError(
                "LC-MAE's second view needs the batch's mask_noise (drawn in collate: batch_noise)"
            )
        return disjoint_mask(mask, noise)

    def online(self, latent: torch.Tensor) -> torch.Tensor:
        """Visible patch tokens ``[B, 1 + |V|, D]`` -> q ``[B, D]`` (mean without cls, §3.9 #5)."""
        return self.predictor(self.projector(latent[:, 1:].mean(dim=1)))

    def forward(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> MethodOutput:
        """One LC-MAE step.

        Args:
            batch: ``batch["images"]`` = [view 1 (SRC + flip), view 2 (+ colour distortion)], each
                float ``[B, 3, H, W]`` ImageNet-normalised.
            mask: bool ``[B, N]``, True = masked, view 1's mask (equal counts, ratio >= 0.5).
            targets: unused (the momentum model makes its own).

        Returns:
            ``MethodOutput(loss_pix + alpha * loss_guidance, metrics, aux)``.
        """
        x1, x2 = batch["images"][0], batch["images"][1]
        b = x1.shape[0]
        if self.cfg.cross_view:
            mask2 = self.second_mask(mask, batch.get("mask_noise"))
            # One encoder pass over both masked views (per-token ops only, so equal to two passes).
            latent = self.encoder(torch.cat([x1, x2]), torch.cat([mask, mask2]), mode="visible").x
            lat1, lat2 = latent[:b], latent[b:]
            k = self.momentum_targets(torch.cat([x1, x2]))  # [2B, D]: k1, k2
            # The heads run per view, so BatchNorm sees each view's batch as in LUT.
            q1, q2 = self.online(lat1), self.online(lat2)
            loss_guidance = 0.5 * (guidance_loss(q1, k[b:]) + guidance_loss(q2, k[:b]))
        else:
            lat1 = self.encoder(x1, mask, mode="visible").x
            loss_guidance = guidance_loss(self.online(lat1), self.momentum_targets(x2))
        dec = self.decoder(lat1, mask, return_hidden=self.return_stack_hidden)
        loss_pix = pixel_mse_loss(dec.pred, patchify(x1, self.encoder.patch_size), mask, self.cfg.norm_pix)
        loss = loss_pix + self.cfg.alpha * loss_guidance
        metrics = {
            "loss_pix": loss_pix.detach(),
            "loss_guidance": loss_guidance.detach(),
            "momentum": torch.tensor(self.momentum_at(self.momentum_model.num_updates)),
        }
        aux: dict[str, Any] = {}
        if self.return_stack_hidden:
            aux = {"stack_hidden": [h[:, 1:] for h in dec.hidden], "stack_mask": mask}
        return self.finish(MethodOutput(loss, metrics, aux))

    def reconstruct(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> Reconstruction:
        """The decoder's pixels for view 1 under its mask (the momentum branch plays no part)."""
        x1 = batch["images"][0]
        pred = self.decoder(self.encoder(x1, mask, mode="visible").x, mask).pred
        p = self.encoder.patch_size
        return Reconstruction(x1, mask, predicted_image(pred, x1, p, self.encoder.grid, self.cfg.norm_pix))


def _maybe_sync_bn(method: LCMAE, wanted: bool) -> bool:
    """Convert the heads' BatchNorm to SyncBatchNorm in multi-process CUDA runs (§3.3).

    PyTorch's SyncBatchNorm refuses CPU tensors (gloo), so multi-process CPU runs keep per-rank
    BatchNorm, say so, and average the running stats after each step (:func:`average_buffers`).

    Returns:
        True when the heads now use SyncBatchNorm.
    """
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not (wanted and multi):
        return False
    if not torch.cuda.is_available():
        if dist.get_rank() == 0:
            print("[mimscale] lc_mae: SyncBatchNorm needs CUDA; the heads use per-rank BatchNorm with "
                  "running stats averaged across ranks after each step", flush=True)  # fmt: skip
        return False
    method.projector = nn.SyncBatchNorm.convert_sync_batchnorm(method.projector)
    method.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(method.predictor)
    return True
