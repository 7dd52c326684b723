"""Mask generators: exact counts, BEiT block statistics, SimMIM structure, determinism; the per-sample
mask noise and LC-MAE's second view against the official (LUT) shuffle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mimscale.config import MaskConfig
from mimscale.masking import (
    BlockMask,
    CoarseRandomMask,
    RandomMask,
    batch_noise,
    build_mask_generator,
    disjoint_mask,
)


def _draw(gen, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([gen(rng) for _ in range(n)])


def _right_neighbour_rate(masks: np.ndarray, grid: tuple[int, int]) -> float:
    """P(right neighbour masked | cell masked): ~ratio for random masks, high for blocks."""
    m = masks.reshape(-1, *grid)
    return float((m[:, :, :-1] & m[:, :, 1:]).sum() / m[:, :, :-1].sum())


@pytest.mark.parametrize(("ratio", "expected"), [(0.75, 147), (0.5, 98), (0.4, 79), (0.0, 0)])
def test_random_mask_uses_mae_len_keep_rule(ratio: float, expected: int) -> None:
    masks = _draw(RandomMask((14, 14), ratio), 50)
    assert masks.shape == (50, 196) and masks.dtype == bool
    assert (masks.sum(1) == expected).all()  # N - int(N * (1 - ratio))
    if ratio > 0:  # unstructured: a masked cell's neighbour is masked at about the base rate
        assert _right_neighbour_rate(masks, (14, 14)) < ratio + 0.1


@pytest.mark.parametrize("num", [30, 49, 98, 120])
def test_block_mask_exact_count(num: int) -> None:
    masks = _draw(BlockMask((14, 14), num, min_num_patches=16, exact=True), 200)
    assert (masks.sum(1) == num).all()


def test_block_mask_beit_early_break_may_under_mask() -> None:
    masks = _draw(BlockMask((14, 14), 75, exact=False), 300)
    counts = masks.sum(1)
    assert counts.max() <= 75
    assert counts.mean() > 70  # BEiT nearly always reaches its budget, but not always exactly


def test_block_mask_shape_statistics() -> None:
    """Blocks: few connected components and strongly clustered cells, unlike random masks."""
    grid = (14, 14)
    block = _draw(BlockMask(grid, 98), 300).reshape(-1, *grid)
    rand = _draw(RandomMask(grid, 0.5), 300).reshape(-1, *grid)
    comps_block = np.mean([ndimage.label(m)[1] for m in block])
    comps_rand = np.mean([ndimage.label(m)[1] for m in rand])
    assert comps_block < 3 < 10 < comps_rand
    assert _right_neighbour_rate(block, grid) > 0.8 > 0.6 > _right_neighbour_rate(rand, grid)


def test_block_mask_single_block_geometry() -> None:
    """One block of the budget: a filled rectangle whose aspect lies in [0.3, 1/0.3] (+rounding)."""
    grid = (14, 14)
    gen = BlockMask(grid, 24, min_num_patches=24, max_num_patches=24, exact=False)
    rng = np.random.default_rng(1)
    aspects = []
    for _ in range(300):
        m = gen(rng).reshape(grid)
        labels, n = ndimage.label(m)
        first = labels == 1
        rows, cols = np.flatnonzero(first.any(1)), np.flatnonzero(first.any(0))
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        if n == 1 and m.sum() == h * w:  # the typical case: one rectangle
            assert 24 * 0.5 <= h * w <= 24
            aspects.append(h / w)
    assert len(aspects) > 150
    assert 0.25 <= min(aspects) and max(aspects) <= 4.0
    assert min(aspects) < 0.6 and max(aspects) > 1.6  # both orientations occur


def test_simmim_mask_counts_and_structure() -> None:
    gen = CoarseRandomMask(224, 16, mask_patch_size=32, ratio=0.6)
    masks = _draw(gen, 50)
    assert (masks.sum(1) == 120).all()  # ceil(49 * 0.6) = 30 mask patches x 4 tokens
    grid = masks.reshape(-1, 7, 2, 7, 2)  # each 32-px mask patch covers a 2x2 token block
    assert (grid.all(axis=(2, 4)) == grid.any(axis=(2, 4))).all()


def test_masks_are_deterministic_given_the_rng() -> None:
    for gen in (RandomMask((14, 14), 0.75), BlockMask((14, 14), 98), CoarseRandomMask(224, 16)):
        assert (_draw(gen, 5, seed=3) == _draw(gen, 5, seed=3)).all()
        assert (_draw(gen, 5, seed=3) != _draw(gen, 5, seed=4)).any()


def test_build_mask_generator() -> None:
    assert build_mask_generator(MaskConfig(kind="none"), (14, 14), 224, 16) is None
    block = build_mask_generator(MaskConfig(kind="block", ratio=0.5), (14, 14), 224, 16)
    assert isinstance(block, BlockMask) and block.num_masked == 98 and block.exact
    block = build_mask_generator(MaskConfig(kind="block", num_masked=30), (14, 14), 224, 16)
    assert block.num_masked == 30
    rand = build_mask_generator(MaskConfig(kind="random", ratio=0.75), (14, 14), 224, 16)
    assert isinstance(rand, RandomMask) and rand.num_masked == 147
    sim = build_mask_generator(MaskConfig(kind="random_coarse", ratio=0.6), (14, 14), 224, 16)
    assert isinstance(sim, CoarseRandomMask) and sim.num_masked == 120


def test_mask_noise_is_a_function_of_seed_epoch_and_key() -> None:
    a = batch_noise(7, 3, ["x", "y", "z"], 16, repeats=2)
    assert a.shape == (6, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() < 1
    # sample "y" owns rows 2 and 3 wherever it lands in a batch (rank, worker, position)
    b = batch_noise(7, 3, ["y"], 16, repeats=2)
    assert torch.equal(a[2:4], b)
    assert not torch.equal(a[2], a[3])  # each of a sample's R masks has its own noise
    assert not torch.equal(batch_noise(7, 4, ["y"], 16, 2), b)  # another epoch
    assert not torch.equal(batch_noise(8, 3, ["y"], 16, 2), b)  # another seed
    assert batch_noise(7, 3, [], 16).shape == (0, 16)


def _lut_pair(n: int, len_keep: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LUT's draw (naver-ai/lut ``random_masking``, docs/methods.md §3.2 step 2), written out:
    one shuffle of uniform noise, view 1 keeps its first |V| ids, view 2 the next |V|."""
    ids = torch.rand(n, generator=g).argsort()
    m1, m2 = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    m1[ids[:len_keep]], m2[ids[len_keep : 2 * len_keep]] = False, False
    return m1, m2


def _ours(gen: RandomMask, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mimscale's draw: the collate mask, then the second view from the per-sample noise."""
    rng = np.random.default_rng(0)
    m1 = torch.from_numpy(np.stack([gen(rng) for _ in range(count)]))
    noise = batch_noise(0, 0, [f"s{i}" for i in range(count)], gen.num_patches)
    return m1, disjoint_mask(m1, noise)


def test_lc_mae_masks_match_the_official_shuffle_statistics() -> None:
    """Parity with LUT: with N = 4 and ratio 0.75 (|V| = 1) the official shuffle makes each of the
    12 ordered (view 1, view 2) visible pairs equally likely; ours must too, and agree with the
    official draw simulated here."""
    gen, count = RandomMask((2, 2), 0.75), 24000
    m1, m2 = _ours(gen, count)
    cells = ((~m1).float().argmax(1) * 4 + (~m2).float().argmax(1)).bincount(minlength=16)
    ours = cells.float() / count
    g = torch.Generator().manual_seed(0)
    lut = torch.zeros(16)
    for _ in range(6000):
        a, b = _lut_pair(4, 1, g)
        lut[int((~a).float().argmax()) * 4 + int((~b).float().argmax())] += 1 / 6000
    diagonal = torch.arange(4) * 5  # the same patch visible in both views: never
    assert ours[diagonal].sum() == 0 and lut[diagonal].sum() == 0
    off = torch.ones(16, dtype=torch.bool)
    off[diagonal] = False
    torch.testing.assert_close(ours[off], torch.full((12,), 1 / 12), atol=0.01, rtol=0)  # 5 sigma
    torch.testing.assert_close(ours[off], lut[off], atol=0.02, rtol=0)


def test_lc_mae_masks_at_vit_b_scale_have_the_official_counts() -> None:
    """ViT-B/16 at 224, ratio 0.75: both views keep 49 of 196 patches, disjointly, and every patch
    is visible in view 2 with probability 49/196 as in LUT's shuffle."""
    gen, count = RandomMask((14, 14), 0.75), 2000
    m1, m2 = _ours(gen, count)
    assert ((~m1).sum(1) == 49).all() and ((~m2).sum(1) == 49).all() and not (~m1 & ~m2).any()
    freq = (~m2).float().mean(0)
    assert abs(freq.mean().item() - 0.25) < 1e-6  # exact: 49 per row
    assert freq.min() > 0.25 - 0.05 and freq.max() < 0.25 + 0.05  # ~5 sigma per patch at 2000 rows
    lut1, lut2 = _lut_pair(196, 49, torch.Generator().manual_seed(0))
    assert (~lut2).sum() == 49 and not (~lut1 & ~lut2).any()
