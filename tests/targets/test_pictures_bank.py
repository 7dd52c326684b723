"""Reconstruction pictures with a precomputed teacher: the fixed picture set comes from the
training shards the bank covers, carries the bank's targets, and MR-MAE draws it."""

from __future__ import annotations

import torch
from bank_helpers import tiny_recipe

from mimscale.data.pipeline import build_train_loader
from mimscale.engine.pictures import picture_batch, reconstruct_rows
from mimscale.engine.setup import build_target_provider, prepare_batch, seed_everything
from mimscale.methods import build_method

CPU = torch.device("cpu")


def test_pictures_with_a_precomputed_teacher(small_digits, bank_factory) -> None:
    bank = bank_factory("mr_mae", "fp32")
    r = tiny_recipe(
        "mr_mae", small_digits, "teacher.source=precomputed", f"teacher.bank={bank}",
        f"data.val={small_digits}", "train.recon_images=6",
    )  # fmt: skip
    loader = build_train_loader(
        r.data, r.mask, img_size=32, patch_size=4, batch_size=16, seed=r.run.seed, rank=0, world_size=1,
        bank=r.teacher.bank,
    )  # fmt: skip
    first = picture_batch(r, loader.spec)
    again = picture_batch(r, loader.spec)
    assert first["keys"] == again["keys"] and len(first["keys"]) == 6 and first["valid"].all()
    # the training shards' first images in order (the bank holds no targets for other splits)
    assert first["keys"] == sorted(first["keys"])
    for key in ("mask", "mask_noise"):
        assert torch.equal(first[key], again[key])
    assert set(first["teacher"]) and all(
        torch.equal(v, again["teacher"][k]) for k, v in first["teacher"].items()
    )
    batch = prepare_batch(first, CPU, torch.float32)
    targets = build_target_provider(r, CPU)(batch)
    assert targets.cls_attn is not None  # from the bank: focused sampling draws the picture's mask
    seed_everything(0)
    rec = reconstruct_rows(build_method(r), batch, targets)
    assert rec.pred.shape == rec.images.shape == (6, 3, 32, 32)
    assert ((~rec.mask).sum(1) == 16).all()  # 75% of 64 masked: |V| = 16, chosen by the attention
