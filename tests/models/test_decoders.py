"""MAE decoder: visible tokens return to their raster positions, mask tokens fill the rest."""

from __future__ import annotations

import torch

from mimscale.models.decoders import MAEDecoder


def test_sequence_matches_an_explicit_unshuffle() -> None:
    torch.manual_seed(0)
    dec = MAEDecoder(embed_dim=8, grid=(2, 3), out_dim=5, dim=4, depth=0, num_heads=2).eval()
    torch.nn.init.normal_(dec.mask_token)  # a non-zero token, so misplacing it shows
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, True, True, False, False]])
    x = torch.randn(2, 1 + 3, 8)  # cls + 3 visible tokens per sample, raster order
    out = dec(x, mask).pred  # [B, N, out_dim]
    for b in range(2):
        seq, k = [dec.embed(x[b, 0])], 1
        for i in range(6):
            if mask[b, i]:
                seq.append(dec.mask_token[0, 0])
            else:
                seq.append(dec.embed(x[b, k]))
                k += 1
        ref = dec.pred(dec.norm(torch.stack(seq) + dec.pos_embed[0]))[1:]
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-6)


def test_hidden_states_per_block() -> None:
    dec = MAEDecoder(embed_dim=8, grid=(2, 2), out_dim=3, dim=4, depth=2, num_heads=2)
    mask = torch.tensor([[True, False, True, False]])
    out = dec(torch.randn(1, 3, 8), mask, return_hidden=True)
    assert out.pred.shape == (1, 4, 3) and len(out.hidden) == 3
    assert all(h.shape == (1, 5, 4) for h in out.hidden)
