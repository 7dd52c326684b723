"""MTO: masked token optimization, a plug-in for any method that feeds mask tokens through a
transformer stack (Choi et al., "Emerging Property of Masked Token for Effective Pre-training";
docs/methods.md §5).

The host (MAE's decoder, SimMIM's encoder, ...) returns the ``L + 1`` hidden states of that stack
in ``MethodOutput.aux`` when ``return_stack_hidden`` is set; no attention internals are read, so
fused attention stays on. From them MTO computes, per sample and in fp32:

- H^l, the mean row entropy of softmax(X_M^l X_V^l^T) over the visible columns (Eq. 2);
- L_spa, the entropy of the visible rows of softmax(X^0 X^0^T) over all columns (Eq. 3);
- L_e = 1 / (H^0 + eps) (Eq. 4);
- L_r = sum_l softplus(+-(H^l - H^{l-1})) (Eq. 5, sign per ``rank_sign``, §5.8 #1);

and adds ``lambda_spa L_spa + lambda_e L_e + lambda_r L_r`` to the host's loss (Alg. 1).
:func:`attach` wires it onto a built method; ``mimscale.methods.build_method`` calls it when the
recipe's ``mto.enabled`` is true. Every §5.8 ambiguity is a key of :class:`MTOConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import MTOConfig, RecipeError

if TYPE_CHECKING:
    from mimscale.config import Recipe
    from mimscale.methods.base import Method, MethodOutput


def check_recipe(recipe: Recipe, method_cls: type[Method]) -> None:
    """Recipe validation: MTO needs a host that feeds mask tokens through a stack (§5.1)."""
    cfg = recipe.mto
    if not cfg.enabled:
        return
    if not method_cls.feeds_mask_tokens:
        raise RecipeError(
            f".mto.enabled: method {recipe.method} feeds no mask tokens through a transformer "
            "stack, so MTO has nothing to attach to (hosts: mae, simmim, lc_mae, ...)"
        )
    if isinstance(cfg.logit_scale, float) and cfg.logit_scale <= 0:
        raise RecipeError(f".mto.logit_scale: must be > 0, got {cfg.logit_scale}")
    if cfg.eps <= 0:
        raise RecipeError(f".mto.eps: must be > 0, got {cfg.eps}")


def _logits(x: torch.Tensor, scale: float | str) -> torch.Tensor:
    """fp32 affinity logits ``scale * X X^T``: ``[B, N, D]`` -> ``[B, N, N]``."""
    x = x.float()
    s = 1.0 / x.shape[-1] ** 0.5 if scale == "inv_sqrt_d" else float(scale)
    return s * (x @ x.transpose(1, 2))


def _row_entropy(logits: torch.Tensor, valid_cols: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the valid columns of each row.

    Args:
        logits: ``[B, N, N]``.
        valid_cols: bool ``[B, 1 or N, N]``; every row needs at least one valid column.

    Returns:
        ``[B, N]``, ``-sum_j A_ij log A_ij`` in nats.
    """
    logp = torch.log_softmax(logits.masked_fill(~valid_cols, float("-inf")), dim=-1)
    # Zero the -inf logs of invalid columns *before* the product: 0 * -inf would give NaN values
    # and NaN gradients (a torch.where after the product still back-propagates 0 * -inf).
    logp = logp.masked_fill(~valid_cols, 0.0)
    return -(logp.exp() * logp).sum(dim=-1)


def heterogeneity(x: torch.Tensor, mask: torch.Tensor, logit_scale: float | str = 1.0) -> torch.Tensor:
    """H^l per sample (docs/methods.md §5.2, Eq. 2), in fp32.

    Args:
        x: ``[B, N, D]`` features of one layer, patch rows only (raster order).
        mask: bool ``[B, N]``, True = masked (the rows of X_M; the others are X_V).
        logit_scale: multiplier of the logits X_M X_V^T (or "inv_sqrt_d").

    Returns:
        ``[B]``: mean over masked rows i of the entropy of softmax_j(X_i . X_j), j visible.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        ent = _row_entropy(_logits(x, logit_scale), (~mask).unsqueeze(1))  # [B, N]
        w = mask.float()
        return (ent * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def sparsity_loss(
    x0: torch.Tensor,
    mask: torch.Tensor,
    logit_scale: float | str = 1.0,
    reduction: str = "mean",
    exclude_diag: bool = False,
) -> torch.Tensor:
    """L_spa per sample (docs/methods.md §5.3a, Eq. 3), in fp32.

    Args:
        x0: ``[B, N, D]`` layer-0 features (the input of the stack's first block).
        mask: bool ``[B, N]``, True = masked.
        logit_scale: multiplier of the logits X^0 X^0^T (or "inv_sqrt_d").
        reduction: "sum" over visible rows (paper) or "mean" over them (default, §5.8 #2).
        exclude_diag: drop the self-affinity column j = i.

    Returns:
        ``[B]``: the (summed or averaged) entropy of the visible rows of softmax(X^0 X^0^T),
        every column included (masked ones too).
    """
    b, n, _ = x0.shape
    with torch.autocast(device_type=x0.device.type, enabled=False):
        cols = torch.ones(1, n, n, dtype=torch.bool, device=x0.device)
        if exclude_diag:
            cols = cols & ~torch.eye(n, dtype=torch.bool, device=x0.device)
        ent = _row_entropy(_logits(x0, logit_scale), cols)  # [B, N]
        w = (~mask).float()
        total = (ent * w).sum(dim=1)
        return total / w.sum(dim=1).clamp_min(1.0) if reduction == "mean" else total


def distinctiveness_loss(h0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L_e = 1 / (H^0 + eps) per sample (docs/methods.md §5.3b, Eq. 4): ``[B]`` -> ``[B]``."""
    return 1.0 / (h0 + eps)


def ranking_loss(h: torch.Tensor, rank_sign: str = "intent") -> torch.Tensor:
    """L_r per sample (docs/methods.md §5.3c, Eq. 5).

    Args:
        h: ``[L + 1, B]``, H^0..H^L.
        rank_sign: "intent" sums softplus(H^l - H^{l-1}) (pushes H down with depth, the text's
            stated goal); "paper_literal" sums softplus(H^{l-1} - H^l) (Eq. 5 as printed).

    Returns:
        ``[B]``.
    """
    step = h[1:] - h[:-1]  # [L, B]: H^l - H^{l-1}
    return F.softplus(step if rank_sign == "intent" else -step).sum(dim=0)


class MTOLoss(nn.Module):
    """The three MTO terms from a stack's hidden states (no parameters, no buffers).

    Args:
        cfg: the recipe's ``mto`` section.
    """

    def __init__(self, cfg: MTOConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self, hidden: list[torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted MTO loss and its metrics.

        Args:
            hidden: ``L + 1`` tensors ``[B, N, D]``: entry 0 enters the first block, entry l
                leaves block l (patch rows only).
            mask: bool ``[B, N]``, True = the row is a mask token.

        Returns:
            ``(loss, metrics)``: scalar ``lambda_spa L_spa + lambda_e L_e + lambda_r L_r``
            (batch means of per-sample terms, §5.8 #9) and detached ``loss_spa``, ``loss_e``,
            ``loss_rank``, ``mto_h{l}`` (batch-mean H^l).
        """
        c = self.cfg
        h = torch.stack([heterogeneity(x, mask, c.logit_scale) for x in hidden])  # [L + 1, B]
        spa = sparsity_loss(hidden[0], mask, c.logit_scale, c.spa_reduction, c.spa_exclude_diag).mean()
        e = distinctiveness_loss(h[0], c.eps).mean()
        r = ranking_loss(h, c.rank_sign).mean()
        loss = c.lambda_spa * spa + c.lambda_e * e + c.lambda_r * r
        metrics = {"loss_spa": spa.detach(), "loss_e": e.detach(), "loss_rank": r.detach()}
        metrics.update({f"mto_h{i}": v for i, v in enumerate(h.detach().mean(dim=1))})
        return loss, metrics


class MTOPlugin(nn.Module):
    """The declared plug-in: adds the MTO terms to the host's output (run by ``Method.finish``).

    Args:
        cfg: the recipe's ``mto`` section.
    """

    def __init__(self, cfg: MTOConfig) -> None:
        super().__init__()
        self.loss = MTOLoss(cfg)

    def forward(self, out: MethodOutput) -> MethodOutput:
        """Host output -> output with the MTO terms added (and the stack's states dropped)."""
        aux = dict(out.aux)
        hidden, mask = aux.pop("stack_hidden", None), aux.pop("stack_mask", None)
        if hidden is None or mask is None:
            raise RuntimeError(
                "MTO: the host has feeds_mask_tokens but returned no aux['stack_hidden'] / "
                "aux['stack_mask'] with return_stack_hidden set"
            )
        extra, metrics = self.loss(hidden, mask)
        # The states are dropped from aux so nothing keeps them alive past the backward pass.
        return out._replace(loss=out.loss + extra, metrics={**out.metrics, **metrics}, aux=aux)


def attach(method: Method, cfg: MTOConfig) -> Method:
    """Enable MTO on a built method, in place.

    The method keeps its class, parameter names (an MAE+MTO checkpoint loads into plain MAE),
    ``encoder``, ``group_matcher``, ``set_grad_checkpointing`` and ``after_step``: MTO adds no
    parameters. It sets ``return_stack_hidden`` and adds :class:`MTOPlugin` to
    ``method.plugins["mto"]``, which the method's ``finish`` runs on every output.

    Args:
        method: a method whose class has ``feeds_mask_tokens``.
        cfg: the recipe's ``mto`` section.

    Returns:
        ``method``.
    """
    if not type(method).feeds_mask_tokens:
        raise ValueError(f"MTO: {type(method).__name__} feeds no mask tokens through a transformer stack")
    method.return_stack_hidden = True
    method.plugins["mto"] = MTOPlugin(cfg)
    return method
