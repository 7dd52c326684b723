"""Seeded mask generators: masks are data, built in collate and carried in the batch.

Every generator returns a flat boolean array of shape ``[N]`` (the token grid flattened
row-major, ``N = H * W``) with **``True = masked``**. That convention is defined here once and
never inverted anywhere else in mimscale.

Generators are pure numpy and draw all randomness from the ``np.random.Generator`` they are
called with, so the data pipeline can seed them per (seed, epoch, rank, worker, batch) and a
resumed run reproduces the same masks.

Masks a method completes on the device (MR-MAE's focused sampling from the teacher's attention,
LC-MAE's second view) draw their randomness from the batch's ``mask_noise``: uniform noise per
sample from (seed, epoch, key), drawn in collate next to the mask (:func:`batch_noise`), and
turned into a mask here (:func:`focused_mask`, :func:`disjoint_mask`). So every random mask a
batch trains with is data: exact resume, precomputed targets and pictures see the same one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from mimscale.targets.bank import key_seed

if TYPE_CHECKING:
    from mimscale.config import MaskConfig

__all__ = [
    "BlockMask",
    "MaskGenerator",
    "RandomMask",
    "CoarseRandomMask",
    "MASK_STREAMS",
    "batch_noise",
    "build_mask_generator",
    "disjoint_mask",
    "focused_mask",
]

# The version of the random streams masks are drawn from, recorded in every checkpoint. 1: MR-MAE's
# focused sampling drew from torch's global generator and LC-MAE's second mask from a hash of the
# batch mask, inside the methods; 2: both from the batch's ``mask_noise``. A run whose method
# draws from the noise (``Method.uses_mask_noise``) does not resume a checkpoint of another version.
MASK_STREAMS = 2
NOISE = 0x6E6F6973  # stream tag of the per-sample mask noise


class MaskGenerator(Protocol):
    """What collate needs from a mask generator."""

    num_patches: int

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Draw one mask: bool ``[num_patches]``, ``True = masked``."""
        ...


class RandomMask:
    """MAE per-sample random masking with MAE's exact count rule.

    MAE keeps ``len_keep = int(N * (1 - ratio))`` tokens (docs/methods.md §1.3), so exactly
    ``N - len_keep`` are masked in every sample (147 of 196 at ratio 0.75).

    Args:
        grid: token grid ``(H, W)``.
        ratio: fraction to mask, ``0 <= ratio < 1``.
    """

    def __init__(self, grid: tuple[int, int], ratio: float) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"RandomMask: ratio must be in [0, 1), got {ratio}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = self.num_patches - int(self.num_patches * (1.0 - ratio))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Returns: bool ``[N]`` with exactly ``num_masked`` True."""
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.permutation(self.num_patches)[: self.num_masked]] = True
        return mask

    def __repr__(self) -> str:
        return f"RandomMask(grid={self.grid}, num_masked={self.num_masked})"


class BlockMask:
    """BEiT block-wise masking (docs/methods.md §1.6), with the CAE exact-count variant.

    Rectangular blocks of at least ``min_num_patches`` cells, aspect ratio log-uniform in
    ``[min_aspect, 1/min_aspect]``, are placed until the budget is met. Each block gets 10
    placement attempts; an attempt is accepted when it adds between 1 and the remaining budget
    of new cells.

    Args:
        grid: token grid ``(H, W)``.
        num_masked: target number of masked cells.
        min_num_patches: minimum block area (16 in BEiT and CAE pre-training).
        max_num_patches: maximum block area; None means the whole remaining budget.
        min_aspect: lower bound of the aspect ratio (upper bound is its inverse).
        exact: True is CAE's loop ``while count != target`` (every mask has exactly
            ``num_masked`` cells, needed by visible-only encoders that reshape to
            ``[B, |V|, D]``); False is BEiT's early break when a round adds nothing, which
            may leave a sample under-masked.
    """

    ATTEMPTS = 10  # per block, as in the BEiT generator
    MAX_ROUNDS = 100_000  # safety net only; the exact loop converges in a few dozen rounds

    def __init__(
        self,
        grid: tuple[int, int],
        num_masked: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        exact: bool = True,
    ) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        if not 0 <= num_masked < self.num_patches:
            raise ValueError(f"BlockMask: num_masked must be in [0, {self.num_patches}), got {num_masked}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"BlockMask: min_aspect must be in (0, 1], got {min_aspect}")
        self.num_masked = int(num_masked)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches) if max_num_patches is not None else self.num_masked
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.exact = exact

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """One block (up to 10 attempts) on the 2-D ``mask`` in place; returns cells added."""
        gh, gw = self.grid
        for _ in range(self.ATTEMPTS):
            # uniform(a, b) with b < a still draws from [b, a], like Python's random.uniform;
            # this happens when the remaining budget is below min_num_patches (harmless).
            area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < gh and w < gw:
                top = int(rng.integers(0, gh - h + 1))
                left = int(rng.integers(0, gw - w + 1))
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[...] = True
                    return added
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Returns: bool ``[N]``; exactly ``num_masked`` True when ``exact``."""
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        for _ in range(self.MAX_ROUNDS):
            if count >= self.num_masked:
                break
            budget = min(self.num_masked - count, self.max_num_patches)
            added = self._place_block(mask, budget, rng)
            if added == 0 and not self.exact:
                break  # BEiT: give up; the sample stays under-masked
            count += added
        else:
            raise RuntimeError(f"{self!r} did not converge in {self.MAX_ROUNDS} rounds")
        return mask.reshape(-1)

    def __repr__(self) -> str:
        return (
            f"BlockMask(grid={self.grid}, num_masked={self.num_masked}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"exact={self.exact})"
        )


class CoarseRandomMask:
    """SimMIM masking (docs/methods.md §1.4): coarse mask patches upsampled to the token grid.

    ``ceil(ratio * M)`` of the ``M = (img_size / mask_patch_size) ** 2`` mask patches are chosen
    uniformly; each covers ``(mask_patch_size / patch_size) ** 2`` tokens. ViT-B/16 at 224:
    30 of 49 mask patches, i.e. 120 of 196 tokens.

    Args:
        img_size: input resolution in pixels.
        patch_size: ViT patch size in pixels.
        mask_patch_size: mask patch size in pixels (a multiple of ``patch_size``).
        ratio: fraction of mask patches to mask.
    """

    def __init__(self, img_size: int, patch_size: int, mask_patch_size: int = 32, ratio: float = 0.6) -> None:
        if img_size % mask_patch_size or mask_patch_size % patch_size:
            raise ValueError(
                f"CoarseRandomMask: need img_size ({img_size}) % mask_patch_size ({mask_patch_size}) == 0"
                " and "
                f"mask_patch_size % patch_size ({patch_size}) == 0"
            )
        self.coarse = img_size // mask_patch_size
        self.scale = mask_patch_size // patch_size
        self.num_patches = (self.coarse * self.scale) ** 2
        self.num_coarse_masked = int(math.ceil(self.coarse**2 * ratio))
        self.num_masked = self.num_coarse_masked * self.scale**2

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Returns: bool ``[N]`` with exactly ``num_masked`` True."""
        coarse = np.zeros(self.coarse**2, dtype=bool)
        coarse[rng.permutation(self.coarse**2)[: self.num_coarse_masked]] = True
        grid = coarse.reshape(self.coarse, self.coarse)
        return grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1).reshape(-1)

    def __repr__(self) -> str:
        return f"CoarseRandomMask(coarse={self.coarse}, scale={self.scale}, num_masked={self.num_masked})"


def build_mask_generator(
    cfg: MaskConfig, grid: tuple[int, int], img_size: int, patch_size: int
) -> MaskGenerator | None:
    """The generator a recipe's ``mask`` section asks for.

    Args:
        cfg: the recipe's mask section.
        grid: token grid ``(H, W)`` of the encoder.
        img_size: input resolution (SimMIM's coarse grid).
        patch_size: ViT patch size (SimMIM's upsampling factor).

    Returns:
        A generator, or None for ``kind: none``. The block generator is always the exact-count
        (CAE) variant, because mimscale's visible-only encoders need equal ``|V|`` per batch.
    """
    n = int(grid[0]) * int(grid[1])
    if cfg.kind == "none":
        return None
    if cfg.kind == "random":
        return RandomMask(grid, cfg.ratio)
    if cfg.kind == "block":
        num = cfg.num_masked if cfg.num_masked is not None else int(round(cfg.ratio * n))
        return BlockMask(grid, num, cfg.min_num_patches, cfg.max_num_patches, cfg.min_aspect, exact=True)
    if cfg.kind == "random_coarse":
        return CoarseRandomMask(img_size, patch_size, cfg.mask_patch_size, cfg.ratio)
    raise ValueError(f"mask.kind: unknown kind {cfg.kind!r}")


# --------------------------------------------------------------------------- noise and device-side masks


def batch_noise(seed: int, epoch: int, keys: list[str], num_patches: int, repeats: int = 1) -> torch.Tensor:
    """The ``mask_noise`` of a batch: uniform float32 ``[B * R, N]`` in [0, 1), laid out as ``mask``
    (sample b owns rows ``b*R .. b*R + R - 1``).

    Each sample's rows are a pure function of (seed, epoch, key): they do not depend on the rank,
    the worker, the batch a sample lands in, or a resume.

    Args:
        seed: the run seed. epoch: the data epoch. keys: the samples' ``__key__`` (B).
        num_patches: N. repeats: R, masks per sample (``mask.repeats``).
    """
    rows = [
        np.random.default_rng([seed % 2**63, epoch, key_seed(k), NOISE]).random(
            (repeats, num_patches), np.float32
        )
        for k in keys
    ]
    return torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, num_patches), np.float32))


def focused_mask(
    saliency: torch.Tensor, num_visible: int, mode: str, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """MR-MAE's visible set chosen from the teacher's attention (docs/methods.md §4.4 options A, B).

    ``sample`` draws |V| tokens without replacement with probabilities ``saliency`` (MILAN's
    recipe) as a Gumbel top-k over the batch noise: the |V| largest ``log s - log(-log u)`` are,
    in distribution, the sequential draws of ``torch.multinomial(s, |V|, replacement=False)``.
    ``topk`` keeps the |V| most attended (no noise).

    Args:
        saliency: float ``[B, N]``, non-negative (the [CLS] attention, rows sum to 1).
        num_visible: |V| per sample.
        mode: "sample" or "topk".
        noise: float ``[B, N]`` uniform in [0, 1), the batch's ``mask_noise`` ("sample" only).

    Returns:
        bool ``[B, N]``, True = masked, exactly ``N - num_visible`` per row.
    """
    if mode == "sample":
        if noise is None:
            raise ValueError("focused sampling needs the batch's mask_noise (drawn in collate: batch_noise)")
        gumbel = -(-noise.float().clamp_min(1e-30).log()).log()
        ids = (saliency.float().log() + gumbel).topk(num_visible, dim=1).indices
    else:
        ids = saliency.topk(num_visible, dim=1).indices
    mask = torch.ones_like(saliency, dtype=torch.bool)
    return mask.scatter(1, ids, False)


def disjoint_mask(mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """LC-MAE's second view: |V| patches drawn uniformly from the first mask's masked set.

    The official code shares one shuffle: view 1 keeps ``ids_shuffle[:, :|V|]``, view 2 keeps
    ``ids_shuffle[:, |V|:2|V|]`` (docs/methods.md §3.2 step 2). Given view 1's visible set, that
    is a uniform |V|-subset of the rest, which is what this draws (no host sync: ranks, not slices).

    Args:
        mask: bool ``[B, N]``, True = masked, ``|V| <= N - |V|`` in every row.
        noise: float ``[B, N]`` in [0, 1) (the batch's ``mask_noise``: the randomness of the draw).

    Returns:
        bool ``[B, N]`` with the same |V| per row, visible set disjoint from ``mask``'s.
    """
    keyed = noise.masked_fill(~mask, 2.0)  # view 1's visible patches sort last
    rank = keyed.argsort(dim=1).argsort(dim=1)  # position of each patch in the shuffle
    num_visible = (~mask).sum(dim=1, keepdim=True)
    return rank >= num_visible
