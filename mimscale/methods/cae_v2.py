"""CAE v2: Context Autoencoder with CLIP Target (Zhang et al., 2022; docs/methods.md §2).

A visible-only encoder (BEiT-style blocks: q/v bias, layer-scale, drop path; CAE sin-cos table)
sees block-wise masked images with an exact masked count; a latent regressor of cross-attention
blocks predicts latents at the masked positions from mask-token queries (§2.3); one shared head
(LN -> FC, then L2-normalise; the code's order, §2.9 item 2) maps the cls, visible and predicted
masked latents to CLIP space; the loss (cosine by default, in fp32) compares them with the frozen
CLIP ViT-B/16 tokens (``ln_post`` and ``proj`` on every token, §2.6) of the same view.

Supervision sets (§2.9 item 3): ``cae_v2_plus`` = {cls, visible, masked} (the released code);
``cae_v2`` = {cls, visible} (the paper's visible-only CAE v2, cls kept as in the code). Without
``masked`` the regressor is not built: nothing would train it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import RecipeError
from mimscale.methods.base import Method, MethodOutput
from mimscale.methods.common import gather_rows
from mimscale.models.regressor import LatentRegressor
from mimscale.models.vit import SIZES, ViTEncoder, visible_ids

if TYPE_CHECKING:
    from mimscale.config import Recipe

Group = Literal["cls", "visible", "masked"]
LossKind = Literal["cosine", "mse", "smooth_l1"]


def feature_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: LossKind, l2_normalize: bool = True
) -> torch.Tensor:
    """Per-row feature distance, in fp32 (docs/methods.md §6.6; CAE v2 Table 2 loss types).

    Args:
        pred: ``[B, n, C]`` head outputs. target: ``[B, n, C]`` teacher features.
        kind: "cosine" (1 - cos), "mse" or "smooth_l1" (beta 1; both averaged over channels).
        l2_normalize: compare L2-normalised rows (CAE v2 normalises both sides; "cosine" always
            does). With False, "mse" / "smooth_l1" compare the raw head output with raw features.

    Returns:
        ``[B, n]`` per-row losses.
    """
    pred, target = pred.float(), target.float()
    if kind == "cosine" or l2_normalize:
        pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    if kind == "cosine":
        return 1.0 - (pred * target).sum(dim=-1)
    if kind == "mse":
        return ((pred - target) ** 2).mean(dim=-1)
    return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(dim=-1)


@torch.no_grad()
def cae_init_(module: nn.Module) -> None:
    """CAE v2 init (docs/methods.md §1.2): xavier-uniform on every Linear (zero bias), LayerNorm 1/0.

    This is the top-level ``_init_weights`` of CAE's ``ContextAutoencoderViT`` and overrides the
    BEiT init of the encoder's Linears; what it leaves -- the patch-embed conv, cls and mask tokens
    at trunc-normal(0.02) cut at +-1 sigma -- comes from ``beit_init_`` and the regressor.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CAEv2(Method):
    """CAE v2: ``encoder`` (ViT, visible tokens), ``regressor`` (masked latents), ``head``.

    Args:
        recipe: the validated recipe; ``recipe.method_cfg`` is :class:`CAEv2.Config`, the teacher
            section sizes the head's output (512 for CLIP-B/16 with ``proj``).
    """

    @dataclass
    class Config:
        """The ``cae_v2:`` recipe section (defaults: ViT-B, the released code, §2.7)."""

        supervise: list[Group] = field(default_factory=lambda: ["cls", "visible", "masked"])
        loss: LossKind = "cosine"
        l2_normalize: bool = True  # mse / smooth_l1 on L2-normalised rows
        loss_weight: float = 1.0  # latent_alignment_loss_weight
        regressor_dim: int | None = None  # None: the encoder width (T: 96 with a Linear + LN)
        regressor_depth: int = 4  # B/L: 4, T/S: 1 (released scripts, §2.9 item 1)
        regressor_heads: int = 12
        regressor_layer_scale: float = 0.1  # 1e-5 for L
        regressor_drop_path: float = 0.1

    num_views: ClassVar[int] = 1
    feeds_mask_tokens: ClassVar[bool] = True  # the regressor's queries are mask tokens (MTO host)
    needs_equal_mask_count: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        from mimscale.teachers import teacher_out_dim

        cfg: CAEv2.Config = CAEv2.config_of(recipe)
        self.cfg = cfg
        self.encoder = ViTEncoder(recipe.model)
        d = self.encoder.embed_dim
        d_reg = cfg.regressor_dim or d
        # §2.2 step 4: Linear + LN to the regressor width on every token, only when it differs.
        self.enc_to_reg = (
            nn.Sequential(nn.Linear(d, d_reg), nn.LayerNorm(d_reg, eps=1e-6)) if d_reg != d else nn.Identity()
        )
        self.regressor = None
        if "masked" in cfg.supervise:
            self.regressor = LatentRegressor(
                d_reg, self.encoder.grid, cfg.regressor_depth, cfg.regressor_heads,
                layer_scale=cfg.regressor_layer_scale, drop_path=cfg.regressor_drop_path,
            )  # fmt: skip
        out_dim = teacher_out_dim(recipe.teacher)
        # §2.2 step 7: one LayerNorm shared by cls / visible / masked rows, then FC to CLIP space.
        self.head = nn.Sequential(nn.LayerNorm(d_reg, eps=1e-6), nn.Linear(d_reg, out_dim))
        cae_init_(self)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Reject recipes CAE v2 cannot run, naming the key."""
        cfg = cls.config_of(recipe)
        if recipe.mask.kind == "none":
            raise RecipeError(
                ".mask.kind: CAE v2 encodes visible patches of a masked image; 'none' masks nothing"
            )
        if recipe.model.rel_pos_bias != "none":
            raise RecipeError(".model.rel_pos_bias: CAE v2 encodes visible tokens only; use 'none'")
        if not cfg.supervise or len(set(cfg.supervise)) != len(cfg.supervise):
            raise RecipeError(
                f".cae_v2.supervise: a non-empty set of cls/visible/masked, got {cfg.supervise}"
            )
        width = cfg.regressor_dim or recipe.model.embed_dim or SIZES[recipe.model.size][0]
        if width % cfg.regressor_heads or width % 4:
            raise RecipeError(
                f".cae_v2.regressor_dim: {width} must be a multiple of 4 and of "
                f"cae_v2.regressor_heads={cfg.regressor_heads}"
            )
        if recipe.mto.enabled and "masked" not in cfg.supervise:
            raise RecipeError(".cae_v2.supervise: MTO attaches to the regressor, which needs 'masked'")

    def forward(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> MethodOutput:
        """One CAE v2 step.

        Args:
            batch: ``batch["images"][0]``: float ``[B, 3, H, W]`` ImageNet-normalised.
            mask: bool ``[B * R, N]``, True = masked, equal counts; R = ``mask.repeats`` masks per
                view (amortised teacher: view b's masks are rows b*R .. b*R + R - 1).
            targets: :class:`~mimscale.teachers.TeacherTargets`, ``tokens`` ``[B, 1 + N, C_t]``.

        Returns:
            ``MethodOutput(loss, {"loss_cls", "loss_visible", "loss_masked"}, aux)``; ``aux`` holds
            the regressor's stack (``[B*R, N, D_reg]`` per state) when ``return_stack_hidden``.
        """
        if targets is None:
            raise ValueError("CAE v2 needs teacher targets (mimscale.teachers.build_provider)")
        images, teacher = batch["images"][0], targets.tokens
        r = mask.shape[0] // images.shape[0]
        if r > 1:  # one teacher forward serves R differently-masked copies of each view
            images, teacher = images.repeat_interleave(r, 0), teacher.repeat_interleave(r, 0)
        z = self.enc_to_reg(self.encoder(images, mask, mode="visible").x)  # [B, 1 + |V|, D_reg]
        n_vis = z.shape[1] - 1
        ids_v = visible_ids(mask, n_vis)  # [B, |V|] raster order, as the encoder kept them
        patches = teacher[:, 1:]  # [B, N, C_t]
        rows = {"cls": (z[:, :1], teacher[:, :1]), "visible": (z[:, 1:], gather_rows(patches, ids_v))}
        aux: dict[str, Any] = {}
        if self.regressor is not None:
            reg = self.regressor(z, mask, return_hidden=self.return_stack_hidden)
            ids_m = visible_ids(~mask, mask.shape[1] - n_vis)  # masked positions, raster order
            rows["masked"] = (reg.masked, gather_rows(patches, ids_m))
            if self.return_stack_hidden:
                aux = {"stack_hidden": [self._raster(z[:, 1:], h, ids_v, ids_m) for h in reg.hidden],
                       "stack_mask": mask}  # fmt: skip
        groups = [g for g in ("cls", "visible", "masked") if g in self.cfg.supervise]
        pred = self.head(torch.cat([rows[g][0] for g in groups], dim=1))  # [B, rows, C_t]
        per_row = feature_loss(pred, torch.cat([rows[g][1] for g in groups], dim=1), self.cfg.loss,
                               self.cfg.l2_normalize)  # fmt: skip
        # Eq. (1): mean over supervised rows; equal counts per image make it the per-image mean.
        loss = self.cfg.loss_weight * per_row.mean()
        metrics, start = {}, 0
        for g in groups:
            n = rows[g][0].shape[1]
            metrics[f"loss_{g}"] = per_row[:, start : start + n].mean().detach()
            start += n
        return self.finish(MethodOutput(loss, metrics, aux))

    @staticmethod
    def _raster(z_v: torch.Tensor, q: torch.Tensor, ids_v: torch.Tensor, ids_m: torch.Tensor) -> torch.Tensor:
        """Visible latents and mask-token queries back on the grid: ``[B, N, D_reg]`` raster order."""
        b, d = z_v.shape[0], z_v.shape[-1]
        out = z_v.new_zeros(b, ids_v.shape[1] + ids_m.shape[1], d)
        out = out.scatter(1, ids_v.unsqueeze(-1).expand(-1, -1, d), z_v)
        return out.scatter(1, ids_m.unsqueeze(-1).expand(-1, -1, d), q)
