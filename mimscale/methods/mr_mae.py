"""MR-MAE: Mimic before Reconstruct (Gao et al., 2023; docs/methods.md §4).

MAE (§1.3: random 75% masking, visible-only encoder, 8 x 512 decoder, norm-pix MSE on masked
patches) plus a **mimic loss on the visible encoder tokens**: a linear head maps each visible
token to the frozen teacher's feature at the same patch (CLIP ViT-B/16 tokens after ``ln_post``,
no ``proj``: 768-d, §4.3; or DINO ViT-B/16). L = 0.5 L_R + 0.5 L_M (§4.2 step 5).

Two tricks from §3.3 of the paper, as switches:
- focused mimicking (§4.4): the teacher's last-block [CLS] attention ``s`` chooses the visible
  set: ``sample`` draws |V| tokens without replacement with probabilities s (MILAN's recipe, the
  default; its randomness is the batch's ``mask_noise``, :func:`mimscale.masking.focused_mask`),
  ``topk`` takes the |V| most attended, ``mimic_subset`` keeps the random visible set and mimics
  only its most attended tokens; ``none`` is plain MR-MAE.
- multi-layer fusion (§4.5): the raw outputs of blocks {d/3, 2d/3, d} are summed and the
  encoder's final LN is applied once to the sum; the fused tokens feed the mimic head and the
  decoder.
MR-MCMAE's masked-convolution stages (a ConvViT backbone) are out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import RecipeError
from mimscale.masking import focused_mask
from mimscale.methods.base import Method, MethodOutput, Reconstruction
from mimscale.methods.common import gather_rows, patchify, pixel_mse_loss, predicted_image
from mimscale.models.decoders import MAEDecoder
from mimscale.models.vit import SIZES, ViTEncoder, mae_init_, visible_ids

if TYPE_CHECKING:
    from mimscale.config import Recipe

Focused = Literal["none", "sample", "topk", "mimic_subset"]


def mimic_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    reduction: Literal["mean", "sum_channels"] = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_M (paper Eq. 2), in fp32: per-token squared error, averaged over the mimicked tokens of
    each sample, then over the batch.

    Args:
        pred: ``[B, n, C]`` mimic-head outputs. target: ``[B, n, C]`` teacher features.
        reduction: "mean" averages the channels of each token (our default, [I]); "sum_channels"
            sums them (the paper's squared L2 norm).
        weight: optional 0/1 ``[B, n]`` selecting the tokens that count (``mimic_subset``).

    Returns:
        Scalar.
    """
    err = (pred.float() - target.float()) ** 2
    per_token = err.sum(dim=-1) if reduction == "sum_channels" else err.mean(dim=-1)  # [B, n]
    if weight is None:
        return per_token.mean()
    w = weight.float()
    return ((per_token * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)).mean()


def normalize_target(x: torch.Tensor, kind: Literal["none", "layernorm_noaffine", "l2"]) -> torch.Tensor:
    """Optional normalisation of the teacher features (§4.3; default none)."""
    x = x.float()
    if kind == "layernorm_noaffine":
        return F.layer_norm(x, x.shape[-1:])
    if kind == "l2":
        return F.normalize(x, dim=-1)
    return x


class MRMAE(Method):
    """MR-MAE: ``encoder`` (ViT, visible tokens), ``decoder`` (MAE's), ``mimic_head`` (Linear).

    Args:
        recipe: the validated recipe; ``recipe.method_cfg`` is :class:`MRMAE.Config`; the teacher
            section sizes the mimic head (768 for CLIP-B/16 without ``proj``).
    """

    @dataclass
    class Config:
        """The ``mr_mae:`` recipe section (defaults: the paper's ViT-B with both tricks, 85.0)."""

        norm_pix: bool = True  # MAE / ConvMAE recipes ([I]; the paper says "RGB values")
        decoder_dim: int = 512
        decoder_depth: int = 8
        decoder_heads: int = 16
        recon_weight: float = 0.5
        mimic_weight: float = 0.5
        mimic_reduction: Literal["mean", "sum_channels"] = "mean"
        target_norm: Literal["none", "layernorm_noaffine", "l2"] = "none"
        focused: Focused = "sample"
        mimic_subset_ratio: float = 0.5  # mimic_subset: fraction of the visible tokens mimicked
        fusion: bool = True
        fusion_layers: list[int] | None = None  # None: {d/3, 2d/3, d}

    num_views: ClassVar[int] = 1
    feeds_mask_tokens: ClassVar[bool] = True  # MAE's decoder carries the mask tokens (MTO host)
    needs_equal_mask_count: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True
    reconstructs_pixels: ClassVar[bool] = True

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        from mimscale.teachers import teacher_out_dim

        cfg: MRMAE.Config = MRMAE.config_of(recipe)
        self.cfg = cfg
        self.encoder = ViTEncoder(recipe.model)
        d, p = self.encoder.embed_dim, self.encoder.patch_size
        self.decoder = MAEDecoder(
            d, self.encoder.grid, p * p * 3, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads
        )
        self.mimic_head = nn.Linear(d, teacher_out_dim(recipe.teacher))
        mae_init_(self.mimic_head)
        self.fusion_layers = fusion_layers(cfg, self.encoder.depth) if cfg.fusion else []
        self.uses_mask_noise = cfg.focused == "sample"

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Reject recipes MR-MAE cannot run, naming the key."""
        cfg = cls.config_of(recipe)
        if recipe.mask.kind == "none":
            raise RecipeError(".mask.kind: MR-MAE reconstructs masked patches; 'none' masks nothing")
        if recipe.model.rel_pos_bias != "none":
            raise RecipeError(".model.rel_pos_bias: MR-MAE encodes visible tokens only; use 'none'")
        if cfg.focused != "none" and not recipe.teacher.cls_attn:
            raise RecipeError(
                f".teacher.cls_attn: mr_mae.focused={cfg.focused!r} needs the teacher's last-block [CLS] "
                "attention; set teacher.cls_attn: true (or mr_mae.focused: none)"
            )
        if not 0.0 < cfg.mimic_subset_ratio <= 1.0:
            raise RecipeError(
                f".mr_mae.mimic_subset_ratio: expected 0 < ratio <= 1, got {cfg.mimic_subset_ratio}"
            )
        depth = recipe.model.depth or SIZES[recipe.model.size][1]
        bad = [i for i in (cfg.fusion_layers or []) if not 1 <= i <= depth]
        if bad or (cfg.fusion_layers is not None and not cfg.fusion_layers):
            raise RecipeError(
                f".mr_mae.fusion_layers: {cfg.fusion_layers} must be non-empty, within 1..{depth}"
            )

    def _inputs(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any) -> tuple[Any, ...]:
        """``(images, teacher tokens, teacher attention, mask, |V|)`` of one step: views repeated
        for the R masks of each, and the focused mask drawn from the teacher's attention."""
        if targets is None:
            raise ValueError("MR-MAE needs teacher targets (mimscale.teachers.build_provider)")
        images, teacher, attn = batch["images"][0], targets.tokens[:, 1:], targets.cls_attn
        r = mask.shape[0] // images.shape[0]
        if r > 1:  # one teacher forward serves R differently-masked copies of each view
            images, teacher = images.repeat_interleave(r, 0), teacher.repeat_interleave(r, 0)
            attn = attn.repeat_interleave(r, 0) if attn is not None else None
        n_vis = mask.shape[1] - int(mask[0].sum())
        if self.cfg.focused in ("sample", "topk"):
            mask = focused_mask(attn, n_vis, self.cfg.focused, batch.get("mask_noise"))
        return images, teacher, attn, mask, n_vis

    def _latent(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's visible tokens; with fusion (§4.5) the raw outputs of the fusion blocks
        summed, then the encoder's final LN once."""
        enc = self.encoder(images, mask, mode="visible", return_layers=self.fusion_layers)
        return self.encoder.final_norm(torch.stack(enc.hidden).sum(0)) if self.fusion_layers else enc.x

    def reconstruct(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> Reconstruction:
        """The decoder's pixels under the step's mask (focused: drawn from the teacher's attention),
        with the first of each view's R masks."""
        r = mask.shape[0] // batch["images"][0].shape[0]
        if "mask_noise" in batch:  # the noise rows of the masks kept
            batch = {**batch, "mask_noise": batch["mask_noise"][::r]}
        images, _, _, mask, _ = self._inputs(batch, mask[::r], targets)
        pred = self.decoder(self._latent(images, mask), mask).pred
        p = self.encoder.patch_size
        return Reconstruction(
            images, mask, predicted_image(pred, images, p, self.encoder.grid, self.cfg.norm_pix)
        )

    def forward(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> MethodOutput:
        """One MR-MAE step.

        Args:
            batch: ``batch["images"][0]``: float ``[B, 3, H, W]`` ImageNet-normalised.
            mask: bool ``[B * R, N]``, True = masked, equal counts; R = ``mask.repeats`` (view b's
                masks are rows b*R .. b*R + R - 1). With ``focused`` sample/topk only its count is
                used: the teacher's attention chooses the visible set.
            targets: :class:`~mimscale.teachers.TeacherTargets` (``tokens`` ``[B, 1 + N, C_t]``,
                ``cls_attn`` ``[B, N]`` when focused).

        Returns:
            ``MethodOutput(loss, {"loss_pix", "loss_mimic", "teacher_norm"}, aux)``.
        """
        images, teacher, attn, mask, n_vis = self._inputs(batch, mask, targets)
        latent = self._latent(images, mask)
        dec = self.decoder(latent, mask, return_hidden=self.return_stack_hidden)
        loss_pix = pixel_mse_loss(
            dec.pred, patchify(images, self.encoder.patch_size), mask, self.cfg.norm_pix
        )
        ids_v = visible_ids(mask, n_vis)  # [B, |V|]
        target = normalize_target(gather_rows(teacher, ids_v), self.cfg.target_norm)  # [B, |V|, C_t]
        weight = None
        if self.cfg.focused == "mimic_subset":  # §4.4 option C: the most attended visible tokens
            k = max(1, round(self.cfg.mimic_subset_ratio * n_vis))
            top = torch.gather(attn, 1, ids_v).topk(k, dim=1).indices
            weight = torch.zeros_like(ids_v, dtype=torch.float32).scatter(1, top, 1.0)
        loss_mimic = mimic_loss(self.mimic_head(latent[:, 1:]), target, self.cfg.mimic_reduction, weight)
        loss = self.cfg.recon_weight * loss_pix + self.cfg.mimic_weight * loss_mimic
        metrics = {
            "loss_pix": loss_pix.detach(),
            "loss_mimic": loss_mimic.detach(),
            "teacher_norm": target.norm(dim=-1).mean().detach(),  # §7: the mimic loss scale
        }
        aux: dict[str, Any] = {}
        if self.return_stack_hidden:
            aux = {"stack_hidden": [h[:, 1:] for h in dec.hidden], "stack_mask": mask}
        return self.finish(MethodOutput(loss, metrics, aux))


def fusion_layers(cfg: MRMAE.Config, depth: int) -> list[int]:
    """The fused blocks: ``cfg.fusion_layers`` or {d/3, 2d/3, d} (docs/methods.md §4.5, [I])."""
    if cfg.fusion_layers is not None:
        return sorted(set(cfg.fusion_layers))
    return sorted({max(1, depth // 3), max(1, 2 * depth // 3), depth})
