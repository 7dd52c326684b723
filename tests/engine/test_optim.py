"""Optimizer groups: which parameters skip weight decay under each recipe rule (docs/methods.md §6.8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimscale.engine.optim import no_decay_names


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("ndim1_bias", {"fc.bias", "norm.weight", "norm.bias"}),
        (
            "ndim1_bias_tokens",
            {"fc.bias", "norm.weight", "norm.bias", "cls_token", "pos_embed", "mask_token"},
        ),
        # SimMIM pre-training skips cls / pos but decays its mask token
        ("ndim1_bias_cls_pos", {"fc.bias", "norm.weight", "norm.bias", "cls_token", "pos_embed"}),
    ],
)
def test_no_decay_rules(rule: str, expected: set[str]) -> None:
    assert no_decay_names(Toy(), rule) == expected
