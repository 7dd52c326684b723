"""ImageNet normalisation, defined once for training, evaluation and export.

Views travel as uint8 ``[B, 3, H, W]`` and are normalised on the device, in the model's dtype.
"""

from __future__ import annotations

import functools

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=8)
def imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0-255 scale, ``[1, 3, 1, 1]``, made once per device (not per batch)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize_uint8(views: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> ImageNet-normalised float ``[B, 3, H, W]`` in ``dtype``."""
    mean, std = imagenet_stats(views.device)
    return ((views.float() - mean) / std).to(dtype)
