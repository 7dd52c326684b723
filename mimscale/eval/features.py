"""Frozen-feature extraction, split across ranks and all-gathered.

Every rank encodes its share of the evaluation shards (``build_eval_loader`` gives each sample
to exactly one rank, center crop, padding samples flagged ``valid = False``); the features and
labels are then all-gathered, so every rank holds the whole set in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from mimscale.data.normalize import normalize_uint8

__all__ = ["Pool", "all_gather_rows", "encode", "extract_features", "normalize_uint8"]

Pool = Literal["cls", "mean"]


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, pool: Pool = "cls") -> torch.Tensor:
    """One image batch -> ``[B, D]`` features of a :class:`~mimscale.models.vit.ViTEncoder`.

    Args:
        encoder: the encoder (all tokens are encoded, no mask).
        images: normalised ``[B, 3, H, W]``.
        pool: ``cls``: the class token after the final norm (MAE linear-probe protocol);
            ``mean``: the mean of the patch tokens after the final norm.
    """
    x = encoder(images).x  # [B, 1 + N, D]
    return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (rows may differ per rank) from every rank, in rank order.

    A no-op without an initialised process group (or with world size 1).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    rows = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(rows), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)])


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    pool: Pool = "cls",
    dtype: torch.dtype | None = None,
    progress: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every valid sample of this rank's share, then all-gather across ranks.

    Collective when a process group is initialised: every rank must call it with a loader of
    the same number of batches (``build_eval_loader`` guarantees it).

    Args:
        encoder: a ViTEncoder-like module (``encoder(images).x`` is ``[B, 1 + N, D]``); the
            caller puts it in eval mode.
        loader: batches with uint8 ``views[0]``, ``labels`` and ``valid`` (the eval loader's).
        device: where to encode.
        pool: feature pooling, see :func:`encode`.
        dtype: input dtype (default: the encoder's parameter dtype).
        progress: a tqdm bar with this label (give it on one rank only); "" = silent.

    Returns:
        ``(features float32 [N, D], labels long [N])`` on ``device``, every rank's rows in rank
        order (within a rank, loader order).
    """
    if dtype is None:
        dtype = next(encoder.parameters()).dtype
    feats, labels = [], []
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=progress, unit="batch", leave=False)
    for batch in loader:
        images = normalize_uint8(batch["views"][0].to(device, non_blocking=True), dtype)
        f = encode(encoder, images, pool).float()
        keep = batch["valid"].to(device)
        feats.append(f[keep])
        labels.append(batch["labels"].to(device)[keep])
    if feats:
        local_f, local_y = torch.cat(feats), torch.cat(labels)
    else:
        width = getattr(encoder, "embed_dim", 0)
        local_f, local_y = (
            torch.zeros(0, width, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )
    return all_gather_rows(local_f), all_gather_rows(local_y)
