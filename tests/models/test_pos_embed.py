"""Sin-cos tables against hand-written per-token formulas (docs/methods.md §1.2)."""

import math

import pytest
import torch

from mimscale.models.pos_embed import cae_sincos_pos_embed, mae_sincos_pos_embed


def _axis(v: float, dim: int) -> list[float]:
    """[sin(v w_0..), cos(v w_0..)] with w_k = 10000^(-k / (dim / 2)), written out per channel."""
    omegas = [10000.0 ** (-k / (dim / 2)) for k in range(dim // 2)]
    return [math.sin(v * o) for o in omegas] + [math.cos(v * o) for o in omegas]


def test_mae_layout_hand_values():
    # D = 8: omega = (1, 1/100). First half = column, second half = row (meshgrid(w, h) quirk).
    table = mae_sincos_pos_embed(8, 2)
    assert table.shape == (5, 8) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)
    row, col = 1, 0  # token 3 of a 2x2 grid in raster order is (row 1, col 0) -> index 1 + 2
    expect = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    expect += [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert torch.allclose(table[1 + 2], torch.tensor(expect), atol=1e-7)


@pytest.mark.parametrize("grid", [(3, 3), (2, 5)])
def test_mae_layout_every_token(grid):
    dim = 16
    table = mae_sincos_pos_embed(dim, grid, cls_token=False)
    h, w = grid
    for t in range(h * w):
        r, c = divmod(t, w)
        expect = torch.tensor(_axis(c, dim // 2) + _axis(r, dim // 2))
        assert torch.allclose(table[t], expect, atol=1e-6), t


def test_cae_layout_every_token():
    # [sin(a), cos(a), sin(b), cos(b)] with a = raster row (torch.meshgrid(w, h) 'ij' quirk).
    dim, g = 16, 3
    table = cae_sincos_pos_embed(dim, g)
    assert table.shape == (1 + g * g, dim) and torch.all(table[0] == 0)
    q = dim // 4
    omegas = [10000.0 ** (-k / q) for k in range(q)]
    for t in range(g * g):
        r, c = divmod(t, g)
        expect = [math.sin(r * o) for o in omegas] + [math.cos(r * o) for o in omegas]
        expect += [math.sin(c * o) for o in omegas] + [math.cos(c * o) for o in omegas]
        assert torch.allclose(table[1 + t], torch.tensor(expect), atol=1e-6), t


def test_layouts_differ_and_need_multiple_of_four():
    assert not torch.allclose(mae_sincos_pos_embed(16, 3), cae_sincos_pos_embed(16, 3))
    with pytest.raises(ValueError, match="embed_dim % 4"):
        mae_sincos_pos_embed(18, 2)
    with pytest.raises(ValueError, match="embed_dim % 4"):
        cae_sincos_pos_embed(18, 2)
