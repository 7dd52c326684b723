"""Fixed 2-D sin-cos position tables (docs/methods.md §1.2).

Two channel layouts exist in the released checkpoints and both are ported with their quirks,
so that those checkpoints load and behave identically:

- MAE (``util/pos_embed.get_2d_sincos_pos_embed``): ``[sin(x), cos(x) | sin(y), cos(y)]`` where
  the first half encodes the *column* index (its ``np.meshgrid(w, h)`` puts w first).
- CAE / CAE v2 (``build_2d_sincos_position_embedding``): ``[sin(a), cos(a), sin(b), cos(b)]``
  where ``torch.meshgrid(w, h)`` with 'ij' indexing makes ``a`` the raster *row* index.

In both, ``omega_k = 10000^(-k / (D/4))`` for ``k < D/4`` and the cls slot is all zeros.
"""

from __future__ import annotations

import torch


def _as_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin(pos * omega), cos(pos * omega)]`` for ``pos`` [M] -> [M, dim] (float64)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def mae_sincos_pos_embed(embed_dim: int, grid: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """The MAE sin-cos table, computed in float64 as the numpy original, returned as float32.

    Args:
        embed_dim: D, a multiple of 4.
        grid: (h, w) patches (or one int for a square grid). MAE itself only builds square
            grids; for h != w the first half still encodes the column, the second the row.
        cls_token: prepend the all-zero cls slot.

    Returns:
        ``[1 + h*w, D]`` (or ``[h*w, D]`` without cls), rows in raster order (row-major).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    h, w = _as_grid(grid)
    # np.meshgrid(grid_w, grid_h) ('xy'): component 0 is the column index, component 1 the row.
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat(
        [_sincos_1d(cols.flatten(), embed_dim // 2), _sincos_1d(rows.flatten(), embed_dim // 2)], 1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def cae_sincos_pos_embed(
    embed_dim: int, grid: int | tuple[int, int], cls_token: bool = True, temperature: float = 10000.0
) -> torch.Tensor:
    """The CAE / CAE v2 sin-cos table, computed in float32 as the torch original.

    Args:
        embed_dim: D, a multiple of 4.
        grid: (h, w) patches (or one int for a square grid).
        cls_token: prepend the all-zero cls slot.
        temperature: the base of omega (10000 in CAE).

    Returns:
        ``[1 + h*w, D]`` (or ``[h*w, D]``): ``[sin(a), cos(a), sin(b), cos(b)]`` where ``(a, b)``
        come from ``torch.meshgrid(arange(w), arange(h))`` ('ij'), so ``a`` is the raster row for
        square grids (the CAE quirk, kept verbatim).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    h, w = _as_grid(grid)
    grid_a, grid_b = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_a = grid_a.flatten()[:, None] * omega[None, :]
    out_b = grid_b.flatten()[:, None] * omega[None, :]
    emb = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb
