"""A precomputed bank gives the online teacher's targets on the replayed view (fp32 bitwise, fp16
within its rounding, int8 cosine >= 0.999, pca:D as codes @ basis + mean), and the method losses
are those of the online teacher; the loader replays the stored view and picks it per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bank_helpers import tiny_recipe

from mimscale.data.pipeline import build_train_loader
from mimscale.data.transforms import render_views
from mimscale.engine.setup import build_target_provider, prepare_batch
from mimscale.targets.bank import BankReader, pick_view
from mimscale.targets.encoding import Pca
from mimscale.teachers import build_provider

CPU = torch.device("cpu")


def loader(recipe, bank: str | None, batch: int = 16):
    return build_train_loader(
        recipe.data, recipe.mask, img_size=recipe.model.img_size, patch_size=recipe.model.patch_size,
        batch_size=batch, seed=recipe.run.seed, rank=0, world_size=1, bank=bank,
    )  # fmt: skip


def first_batch(recipe, bank: str, epoch: int = 0) -> dict:
    ld = loader(recipe, bank)
    ld.set_epoch(epoch)
    return next(iter(ld))


def online(recipe):
    torch.manual_seed(recipe.run.seed)  # the precompute seeds the random teacher the same way
    return build_provider(recipe, CPU)


def precomputed(method: str, train: str, bank: str):
    r = tiny_recipe(method, train, "teacher.source=precomputed", f"teacher.bank={bank}")
    return r, build_target_provider(r, CPU)


@pytest.mark.parametrize("method", ["cae_v2", "mr_mae"])
def test_fp32_bank_is_the_online_teacher_bitwise_on_the_replayed_view(
    small_digits, bank_factory, method
) -> None:
    bank = bank_factory(method, "fp32")
    r, prov = precomputed(method, small_digits, bank)
    batch = first_batch(r, bank)
    got, want = prov(batch), online(r)(batch)
    assert torch.equal(got.tokens, want.tokens)
    assert (got.cls_attn is None) == (method == "cae_v2")
    if got.cls_attn is not None:
        assert torch.equal(got.cls_attn, want.cls_attn)


def test_student_views_are_the_stored_views_pixel_exactly(small_digits, bank_factory) -> None:
    bank = bank_factory("cae_v2", "fp32")
    r, _ = precomputed("cae_v2", small_digits, bank)
    reader = BankReader(bank)
    for epoch in (0, 1):
        ld = loader(r, bank)
        ld.set_epoch(epoch)
        batch = next(iter(ld))
        from mimscale.data.manifest import resolve_source
        from mimscale.data.reader import ErrorPolicy, read_shard

        raw = {}
        for url in resolve_source(small_digits).urls:
            raw |= {s["__key__"]: (url, s["png"]) for s in read_shard(url, ErrorPolicy("fail", 0, 0))}
        for i, key in enumerate(batch["keys"]):
            url, data = raw[key]
            k = pick_view(r.run.seed, epoch, key, 2)
            rec = reader.record(url, key, k)
            px = render_views(data, r.data.views, rec["replay"], draft=r.data.draft)[0]
            assert np.array_equal(batch["views"][0][i].numpy(), px)
            assert np.array_equal(batch["crops"][i].numpy(), rec["replay"][:, :7].astype(np.float32))
    # K = 2 views: across epochs some images switch view, chosen by (seed, epoch, key) only
    keys = [f"k{i}" for i in range(64)]
    picks = [[pick_view(0, e, k, 2) for k in keys] for e in (0, 1)]
    assert picks[0] != picks[1] and set(picks[0]) == {0, 1}


def test_fp16_bank_within_fp16_rounding_and_int8_cosine(small_digits, bank_factory) -> None:
    r = tiny_recipe("cae_v2", small_digits)
    fp32 = precomputed("cae_v2", small_digits, bank_factory("cae_v2", "fp32"))[1]
    batch32 = first_batch(r, bank_factory("cae_v2", "fp32"))
    exact = fp32(batch32).tokens
    for enc in ("fp16", "int8"):
        bank = bank_factory("cae_v2", enc)
        rr, prov = precomputed("cae_v2", small_digits, bank)
        batch = first_batch(rr, bank)
        assert torch.equal(batch["views"][0], batch32["views"][0])  # the same views, whatever the encoding
        got = prov(batch).tokens
        if enc == "fp16":
            assert torch.equal(got, exact.half().float())
        else:
            cos = torch.nn.functional.cosine_similarity(got, exact, dim=-1)
            assert cos.min() >= 0.999, cos.min()
            assert not torch.equal(got, exact)


def test_pca_decode_is_codes_at_basis_plus_mean(small_digits, bank_factory) -> None:
    bank = bank_factory("cae_v2", "pca:8")
    manifest = json.loads((Path(bank) / "manifest.json").read_text())
    pca = Pca.from_json(manifest["pca"])
    assert pca.basis.shape == (8, 32) and 0 < pca.explained_variance <= 1
    np.testing.assert_allclose(pca.basis @ pca.basis.T, np.eye(8), atol=1e-5)  # orthonormal rows
    r, prov = precomputed("cae_v2", small_digits, bank)
    batch = first_batch(r, bank)
    codes = batch["teacher"]["codes"].numpy().astype(np.float64)  # [B, T, 8] fp16 codes
    hand = codes @ pca.basis.astype(np.float64) + pca.mean.astype(np.float64)
    np.testing.assert_allclose(prov(batch).tokens.numpy(), hand, rtol=1e-5, atol=1e-5)
    # and the codes are the projection of the exact teacher output (to fp16 rounding)
    exact = online(r)(batch).tokens.numpy()
    proj = (exact - pca.mean) @ pca.basis.T
    np.testing.assert_allclose(codes, proj, rtol=2e-3, atol=2e-3)
    assert manifest["fidelity"]["explained_variance"] == pca.explained_variance


@pytest.mark.parametrize(
    ("method", "extra"), [("cae_v2", []), ("mr_mae", []), ("cae_v2", ["mask.repeats=2"])]
)
def test_method_loss_with_precomputed_fp32_equals_online(small_digits, bank_factory, method, extra) -> None:
    """The same loss from the bank as from the online teacher (also with amortised masks: R masks
    per view, one stored target row per view)."""
    from mimscale.methods import build_method

    bank = bank_factory(method, "fp32")
    r = tiny_recipe(method, small_digits, "teacher.source=precomputed", f"teacher.bank={bank}", *extra)
    prov = build_target_provider(r, CPU)
    batch = prepare_batch(first_batch(r, bank), CPU, torch.float32)
    torch.manual_seed(0)
    model = build_method(r).eval()
    losses = []
    for targets in (prov(batch), online(r)(batch)):
        torch.manual_seed(1)  # MR-MAE's focused sampling draws from the global generator
        losses.append(model(batch, batch["mask"], targets).loss)
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    assert batch["mask"].shape[0] == len(batch["keys"]) * r.mask.repeats
