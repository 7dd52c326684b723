"""CAE's latent regressor: cross-attention blocks whose queries are mask tokens (docs/methods.md §2.3).

Each block updates only the masked queries; keys and values are re-formed every block from the
fixed visible latents and the current queries. Three separate LayerNorms build q, k and v;
position enters q and k but **not** v; the block LayerNorms its own residual stream after the
attention (not a pre-norm branch). q/v have learnable biases, k none. Layer-scale on both branches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.models.pos_embed import cae_sincos_pos_embed
from mimscale.models.vit import beit_trunc_normal_, visible_ids


class CrossAttention(nn.Module):
    """Multi-head cross-attention with separate bias-free q/k/v Linears plus q and v biases.

    Args:
        dim: width. num_heads: heads (scale ``head_dim ** -0.5``).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q``: ``[B, n_q, D]``; ``k``, ``v``: ``[B, n_kv, D]`` -> ``[B, n_q, D]``."""
        b, nq, d = q.shape
        h = self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, h, n, D / h]
            return x.reshape(b, x.shape[1], h, d // h).transpose(1, 2)

        q = heads(F.linear(q, self.q.weight, self.q_bias))
        k = heads(self.k(k))
        v = heads(F.linear(v, self.v.weight, self.v_bias))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D / h)) v
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class RegressorBlock(nn.Module):
    """One CAE regressor block (docs/methods.md §2.3, steps 1-6).

    Args:
        dim: width. num_heads: heads. mlp_ratio: MLP hidden ratio. layer_scale: gamma init.
        drop_path: stochastic depth of both branches.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: float, drop_path: float
    ) -> None:
        super().__init__()
        from timm.layers import DropPath, Mlp

        ln = lambda: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
        self.norm_q, self.norm_k, self.norm_v, self.norm2 = ln(), ln(), ln(), ln()
        self.attn = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x_q: torch.Tensor, x_kv: torch.Tensor, pos_q: torch.Tensor, pos_kv: torch.Tensor
    ) -> torch.Tensor:
        """``x_q``, ``pos_q``: ``[B, |M|, D]``; ``x_kv``, ``pos_kv``: ``[B, |V| + |M|, D]``."""
        a = self.attn(self.norm_q(x_q + pos_q), self.norm_k(x_kv + pos_kv), self.norm_v(x_kv))  # no pos on v
        x = x_q + self.drop_path(self.gamma_1 * a)
        x = self.norm2(x)  # LN on the residual stream itself
        return x + self.drop_path(self.gamma_2 * self.mlp(x))


class RegressorOutput(NamedTuple):
    """``cls``: ``[B, 1, D_reg]``; ``visible``: ``[B, |V|, D_reg]``; ``masked``: ``[B, |M|, D_reg]``
    (visible and masked rows in raster order). ``hidden``: empty, or the ``R + 1`` query states
    ``[B, |M|, D_reg]`` (entry 0 = the mask tokens entering block 1)."""

    cls: torch.Tensor
    visible: torch.Tensor
    masked: torch.Tensor
    hidden: list[torch.Tensor]


class LatentRegressor(nn.Module):
    """Mask-token queries -> ``depth`` regressor blocks over the (fixed) visible latents.

    The encoder -> regressor width change (Linear + LN, docs/methods.md §2.7 for ViT-T) belongs to the
    caller, so the visible latents reach here at width ``dim``.

    Args:
        dim: regressor width D_reg.
        grid: (h, w) patch grid.
        depth: R. num_heads: heads. mlp_ratio: 4. layer_scale: gamma init. drop_path: max rate
            (linear 0 -> drop_path over the R blocks).
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layer_scale: float = 0.1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.grid, self.dim = grid, dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        beit_trunc_normal_(self.mask_token, std=0.02)  # CAE: cut at +-1 sigma (docs/methods.md §1.2)
        # The regressor's own fixed table at its width, CAE layout, no cls slot (§1.2).
        self.pos_embed: torch.Tensor
        self.register_buffer("pos_embed", cae_sincos_pos_embed(dim, grid, cls_token=False), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, mlp_ratio, layer_scale, r) for r in rates)

    def forward(self, z: torch.Tensor, mask: torch.Tensor, return_hidden: bool = False) -> RegressorOutput:
        """Predict latents at the masked positions.

        Args:
            z: ``[B, 1 + |V|, D_reg]`` encoder latents (cls first, visible patches in raster order).
            mask: bool ``[B, N]``, True = masked, equal counts per row.
            return_hidden: also return the query states entering / leaving each block.

        Returns:
            :class:`RegressorOutput`.
        """
        b, nv = z.shape[0], z.shape[1] - 1
        ids_v = visible_ids(mask, nv)  # [B, |V|] ascending
        ids_m = visible_ids(~mask, mask.shape[1] - nv)  # [B, |M|] ascending: masked positions
        pos = self.pos_embed.to(z.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, N, D_reg]
        pos_v = torch.gather(pos, 1, ids_v.unsqueeze(-1).expand(-1, -1, self.dim))
        pos_m = torch.gather(pos, 1, ids_m.unsqueeze(-1).expand(-1, -1, self.dim))
        z_v = z[:, 1:]
        q = self.mask_token.to(z.dtype).expand(b, ids_m.shape[1], -1)
        pos_kv = torch.cat([pos_v, pos_m], dim=1)
        hidden = [q] if return_hidden else []
        for blk in self.blocks:
            q = blk(q, torch.cat([z_v, q], dim=1), pos_m, pos_kv)  # z_v is never updated (§2.3 item 7)
            if return_hidden:
                hidden.append(q)
        return RegressorOutput(z[:, :1], z_v, q, hidden)
