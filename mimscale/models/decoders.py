"""Decoders that carry mask tokens (MAE's lightweight transformer decoder, docs/methods.md §1.3).

Key names map one-to-one onto MAE's checkpoints: MAE ``decoder_X`` is our ``decoder.X`` and
MAE's top-level ``mask_token`` is ``decoder.mask_token``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from mimscale.models.pos_embed import mae_sincos_pos_embed
from mimscale.models.vit import mae_init_, run_blocks, visible_ids


class DecoderOutput(NamedTuple):
    """``pred``: ``[B, N, out_dim]`` for every patch (cls dropped), raster order.

    ``hidden``: empty, or the ``L + 1`` states ``[B, 1 + N, D_dec]`` of the decoder stack:
    entry 0 enters block 1 (after embed, mask-token insertion and pos add), entry l leaves block l.
    """

    pred: torch.Tensor
    hidden: list[torch.Tensor]


class MAEDecoder(nn.Module):
    """MAE decoder: Linear D -> D_dec, mask tokens at masked positions, fixed sin-cos pos,
    ``depth`` timm blocks, LayerNorm, Linear D_dec -> ``out_dim``.

    Args:
        embed_dim: encoder width D.
        grid: (h, w) patch grid of the encoder.
        out_dim: prediction size per patch (p * p * 3 for pixels).
        dim: decoder width (512 in MAE).
        depth: decoder blocks (8 in MAE).
        num_heads: decoder heads (16 in MAE).
        mlp_ratio: MLP hidden ratio (4).
    """

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        out_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.grid, self.num_patches = grid, grid[0] * grid[1]
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = mae_sincos_pos_embed(dim, grid, cls_token=True).unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # fixed, as MAE
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        self.grad_checkpointing = False
        mae_init_(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, mask: torch.Tensor, return_hidden: bool = False) -> DecoderOutput:
        """Decode visible-token features into per-patch predictions.

        Args:
            x: ``[B, 1 + |V|, D]`` encoder output (cls first, visible patches in raster order,
                as ``ViTEncoder(mode="visible")`` returns them).
            mask: bool ``[B, N]``, True = masked (the mask the encoder was given).
            return_hidden: also return the stack's ``L + 1`` hidden states.

        Returns:
            :class:`DecoderOutput`.
        """
        x = self.embed(x)  # [B, 1 + |V|, D_dec]
        b, _, d = x.shape
        ids = visible_ids(mask, x.shape[1] - 1).unsqueeze(-1).expand(-1, -1, d)  # [B, |V|, D_dec]
        # Mask tokens everywhere, then the visible tokens scattered back to their positions:
        # the same sequence as MAE's append + unshuffle with ids_restore.
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches, d).scatter(1, ids, x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed
        keep = set(range(len(self.blocks) + 1)) if return_hidden else set()
        x, states = run_blocks(self.blocks, x, keep, self.grad_checkpointing)
        pred = self.pred(self.norm(x))[:, 1:]
        return DecoderOutput(pred, [states[i] for i in sorted(states)])
