"""Bank read prefetch: every record a batch reads was first handed to the kernel as read-ahead
(``posix_fadvise(WILLNEED)``, issued before the batch's images decode), and prefetching changes no
batch: the same samples, views and targets as without it."""

from __future__ import annotations

import os

import pytest
import torch
from bank_helpers import tiny_recipe

from mimscale.data.pipeline import build_train_loader
from mimscale.targets.bank import BankReader


def _batches(small_digits: str, bank: str, epoch: int) -> list[dict]:
    r = tiny_recipe("cae_v2", small_digits, "data.epoch_mode=exact", "data.num_workers=0")
    loader = build_train_loader(
        r.data, r.mask, img_size=32, patch_size=4, batch_size=16, seed=0, rank=0, world_size=1, bank=bank
    )
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("epoch", [0, 1, 2])  # each epoch picks other stored views
def test_every_record_read_was_prefetched_first(small_digits, bank_factory, monkeypatch, epoch) -> None:
    bank = bank_factory("cae_v2", "fp16")
    plain = _batches(small_digits, bank, epoch)
    events: list[tuple[str, int, int]] = []
    pread, fadvise = os.pread, os.posix_fadvise

    def spy_pread(fd: int, n: int, offset: int) -> bytes:
        events.append(("read", fd, offset))
        return pread(fd, n, offset)

    def spy_fadvise(fd: int, offset: int, n: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        events.append(("ahead", fd, offset))
        fadvise(fd, offset, n, advice)

    monkeypatch.setattr(os, "pread", spy_pread)
    monkeypatch.setattr(os, "posix_fadvise", spy_fadvise)
    ahead = _batches(small_digits, bank, epoch)
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    assert len(reads) == 128  # one record per image of the epoch
    for i in reads:
        assert ("ahead", *events[i][1:]) in events[:i]
    for a, b in zip(plain, ahead, strict=True):
        assert a["keys"] == b["keys"]
        assert all(torch.equal(a["teacher"][n], b["teacher"][n]) for n in a["teacher"])


def test_prefetch_leaves_problems_to_the_read(small_digits, bank_factory) -> None:
    """A shard or key the bank lacks is no error when prefetching; reading it names it."""
    reader = BankReader(bank_factory("cae_v2", "fp16"))
    reader.prefetch("nowhere-000000.tar", "000000000", 0)
    name = sorted(reader.shard_names)[0]
    reader.prefetch(name, "no-such-key", 0)
    with pytest.raises(Exception, match="no targets for key 'no-such-key'"):
        reader.record(name, "no-such-key", 0)
