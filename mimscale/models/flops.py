"""FLOP counts for MFU (FLOPs = 2 x MACs)."""

from __future__ import annotations


def block_flops(n_tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block on ``n_tokens`` tokens of width ``dim``.

    Per token, MACs: qkv + proj 4 d^2, MLP 2 * mlp_ratio * d^2, attention scores and the
    weighted sum n d each. At mlp_ratio 4 that is 24 d^2 + 4 n d FLOPs per token.
    """
    flops_per_token = 2 * (4 + 2 * mlp_ratio) * dim * dim + 4 * n_tokens * dim
    return float(n_tokens * flops_per_token)
