"""Batch preparation: padding rows leave the batch with their masks; normalisation is the eval one."""

from __future__ import annotations

import torch

from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimscale.engine.setup import keep_valid_rows, prepare_batch
from mimscale.eval.features import normalize_uint8


def batch(valid: list[bool], repeats: int = 2) -> dict:
    b = len(valid)
    return {
        "views": [torch.arange(b).view(b, 1, 1, 1).expand(b, 3, 2, 2).to(torch.uint8)],
        "labels": torch.arange(b),
        "keys": [f"k{i}" for i in range(b)],
        "valid": torch.tensor(valid),
        "mask": torch.arange(b * repeats).view(b * repeats, 1).expand(-1, 4) % 2 == 0,
        "mask_noise": torch.arange(b * repeats, dtype=torch.float32).view(b * repeats, 1).expand(-1, 4),
    }


def test_invalid_rows_and_their_mask_rows_leave() -> None:
    full = batch([True, False, True, False])
    kept = keep_valid_rows(full)
    assert kept["labels"].tolist() == [0, 2] and kept["keys"] == ["k0", "k2"]
    assert kept["views"][0][:, 0, 0, 0].tolist() == [0, 2]
    # sample b owns mask rows 2b and 2b + 1 (mask.repeats = 2)
    torch.testing.assert_close(kept["mask"], full["mask"][[0, 1, 4, 5]])
    assert kept["mask_noise"][:, 0].tolist() == [0, 1, 4, 5]  # the noise rows go with their masks


def test_all_valid_or_none_valid_keeps_the_batch() -> None:
    full = batch([True, True])
    assert keep_valid_rows(full) is full
    none = batch([False, False])
    assert keep_valid_rows(none) is none  # the step still runs on every rank; its loss is zeroed


def test_training_and_evaluation_normalise_alike() -> None:
    views = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    prepared = prepare_batch({"views": [views]}, torch.device("cpu"), torch.float32)["images"][0]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(prepared, (views.float() / 255 - mean) / std)
    torch.testing.assert_close(prepared, normalize_uint8(views))
