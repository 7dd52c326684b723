"""Adding a method touches its file, one registry line, its recipe and its tests (CONTRIBUTING.md).

A throwaway method is defined here, registered with one line, given a recipe file, and trained
for one step through the same builders the engine uses; config.py, the loader and the engine
are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mimscale.config import RecipeError
from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.setup import prepare_batch
from mimscale.methods import METHODS, Method, MethodOutput, build_method
from mimscale.models.vit import ViTEncoder
from mimscale.registry import load_recipe


class MeanToken(Method):
    """Predicts each masked patch's mean colour from the visible tokens' mean (a toy)."""

    @dataclass
    class Config:
        scale: float = 1.0

    def __init__(self, recipe) -> None:
        super().__init__()
        self.cfg = MeanToken.config_of(recipe)
        self.encoder = ViTEncoder(recipe.model)
        self.head = torch.nn.Linear(self.encoder.embed_dim, 3)

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if cls.config_of(recipe).scale <= 0:
            raise RecipeError(".mean_token.scale: must be > 0")

    def forward(self, batch, mask, targets=None) -> MethodOutput:
        x = self.encoder(batch["images"][0], mode="all").x  # [B, 1 + N, D]
        pred = self.head(x[:, 1:].mean(dim=1))  # [B, 3]
        target = batch["images"][0].mean(dim=(2, 3))  # [B, 3]
        loss = self.cfg.scale * ((pred - target) ** 2).mean()
        return self.finish(MethodOutput(loss, {"loss_mean": loss.detach()}))


RECIPE = """\
method: mean_token
mean_token: {scale: 2.0}
model: {size: tiny, img_size: 32, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}
data: {views: [{size: 32}]}
mask: {kind: none}
optim: {blr: 1.0e-4}
train: {micro_batch: 2, global_batch: 2}
"""


def test_a_throwaway_method_needs_one_registry_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(METHODS, "mean_token", MeanToken)  # the one registry line
    path = tmp_path / "mean_token" / "cpu_tiny.yaml"
    path.parent.mkdir()
    path.write_text(RECIPE)
    recipe = load_recipe(path)
    assert recipe.method_cfg == MeanToken.Config(scale=2.0)
    method = build_method(recipe)
    batch = prepare_batch(synthetic_batch(recipe), torch.device("cpu"), torch.float32)
    out = method(batch, batch.get("mask"))
    out.loss.backward()
    assert torch.isfinite(out.loss) and method.head.weight.grad is not None
    with pytest.raises(RecipeError, match=r"mean_token\.scale: must be > 0"):
        load_recipe(path, ["mean_token.scale=0"])
    with pytest.raises(RecipeError, match=r"did you mean mean_token\.scale\? "):
        load_recipe(path, ["mean_token.scael=1"])
