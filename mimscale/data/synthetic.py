"""A synthetic training batch shaped as the collate function makes it (benchmarks and tests).

Random uint8 pixels, real masks: the mask comes from the recipe's own seeded generator, so a
method sees exactly the mask layout it trains on, without reading any shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mimscale.config import Recipe

__all__ = ["synthetic_batch"]


def synthetic_batch(recipe: Recipe, seed: int = 0) -> dict[str, Any]:
    """Random uint8 views and a mask from the recipe's own mask generator.

    Args:
        recipe: a validated recipe (``train.micro_batch`` rows, ``data.views`` sizes, ``mask``).
        seed: seeds the pixels and the mask generator's RNG.

    Returns:
        ``{"views": [uint8 [B, 3, S, S] per view], "keys", "labels": -1 [B]}`` plus ``"mask"``
        (bool ``[B, N]``, True = masked) and its ``"mask_noise"`` when the recipe draws masks.
    """
    from mimscale.masking import batch_noise, build_mask_generator

    b, s = recipe.train.micro_batch, recipe.model.img_size
    g = torch.Generator().manual_seed(seed)
    views = [
        torch.randint(0, 256, (b, 3, v.size, v.size), dtype=torch.uint8, generator=g)
        for v in recipe.data.views
    ]
    grid = (s // recipe.model.patch_size,) * 2
    gen = build_mask_generator(recipe.mask, grid, s, recipe.model.patch_size)
    rng = np.random.default_rng(seed)
    batch: dict[str, Any] = {
        "views": views,
        "keys": [str(i) for i in range(b)],
        "labels": torch.full((b,), -1, dtype=torch.long),
    }
    if gen is not None:
        batch["mask"] = torch.from_numpy(np.stack([gen(rng) for _ in range(b)]))
        batch["mask_noise"] = batch_noise(seed, 0, batch["keys"], gen.num_patches)
    return batch
