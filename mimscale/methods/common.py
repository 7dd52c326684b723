"""Pieces several methods share: patch layout, the pixel loss, row gathers (one definition each)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into flattened patches.

    Args:
        images: ``[B, C, H, W]`` with H and W multiples of ``p``.
        p: patch size.

    Returns:
        ``[B, N, p * p * C]``, patches in raster order, values in (p, q, c) order (MAE's layout:
        row within the patch, column within the patch, channel).
    """
    b, c, hh, ww = images.shape
    h, w = hh // p, ww // p
    x = images.reshape(b, c, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, p * p * C]`` -> ``[B, C, h * p, w * p]``."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, h * p, w * p)


def patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of ``[B, N, P]`` patches, as the norm-pix target uses them
    (unbiased variance + 1e-6, docs/methods.md §1.3)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as torch.var's default in MAE
    return mean, (var + 1.0e-6) ** 0.5


def predicted_image(
    pred: torch.Tensor, images: torch.Tensor, p: int, grid: tuple[int, int], norm_pix: bool
) -> torch.Tensor:
    """Predicted patches ``[B, N, p*p*3]`` as an image ``[B, 3, H, W]`` in the input's space.

    With ``norm_pix`` the prediction is in per-patch normalised units; each patch is mapped back
    with the mean and std of the same patch of ``images`` (the only scale it could have).
    """
    pred = pred.float()
    if norm_pix:
        mean, std = patch_stats(patchify(images.float(), p))
        pred = pred * std + mean
    return unpatchify(pred, p, grid)


def pixel_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MAE reconstruction loss, in fp32 whatever the autocast dtype (docs/methods.md §6.6).

    Args:
        pred: ``[B, N, P]`` predicted patches.
        target: ``[B, N, P]`` patchified input (ImageNet-normalised).
        mask: bool ``[B, N]``, True = masked; only masked patches count.
        norm_pix: normalise each target patch by its mean and unbiased variance (+ 1e-6).

    Returns:
        Scalar: mean over masked (b, i) of the per-patch mean squared error.
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, N]
    w = mask.float()
    return (per_patch * w).sum() / w.sum()


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b]]``: ``[B, N, C]``, long ``[B, n]`` -> ``[B, n, C]``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
