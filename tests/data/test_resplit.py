"""Re-splitting an exact-mode epoch on another world size: the old layout's batches (really read)
plus the remainder's hold every sample of the epoch exactly once; a remainder resumes exactly."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import pytest

from mimscale.config import DataConfig, MaskConfig, ViewConfig
from mimscale.data.manifest import read_manifest
from mimscale.data.pipeline import ShardLoader, build_train_loader
from mimscale.engine.checkpoint import data_position

VIEW = ViewConfig(size=16, crop="resize", hflip=0.0)
B = 16


def _all_keys(manifest: str) -> list[str]:
    base = Path(manifest).parent
    keys = []
    for s in read_manifest(manifest)["shards"]:
        with tarfile.open(base / s["name"]) as tf:
            keys += sorted({m.name.split(".")[0] for m in tf.getmembers()})
    return keys


def _ranks(manifest: str, world: int, workers: int, buffer: int) -> list[ShardLoader]:
    data = DataConfig(
        train=manifest, num_workers=workers, shuffle_buffer=buffer, views=[VIEW], epoch_mode="exact"
    )
    kw = {"img_size": 16, "patch_size": 4, "batch_size": B, "seed": 3, "world_size": world}
    return [build_train_loader(data, MaskConfig(kind="none"), rank=r, **kw) for r in range(world)]


def _read(loader: ShardLoader, n: int | None = None) -> list[dict]:
    """The next ``n`` batches (all that are left: None), as the trainer takes them."""
    batches = list(itertools.islice(iter(loader), n))
    loader.close()
    return batches


def _valid(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]


def _resume(loaders: list[ShardLoader], saved: dict) -> str | None:
    """Every rank loads rank 0's saved state (the checkpoint holds one client state)."""
    state, line = data_position(saved, loaders[0].state_dict())
    for ld in loaders:
        ld.load_state_dict(state)
    return line


def _remainder(loaders: list[ShardLoader]) -> list[list[dict]]:
    runs = [_read(ld) for ld in loaders]
    assert len({len(r) for r in runs}) == 1 and len(runs[0]) == loaders[0].epoch_batches  # equal per rank
    return runs


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("buffer", [0, 64])
def test_resplit_reads_every_sample_of_the_epoch_once(
    digits: dict, before: int, after: int, workers: int, buffer: int
) -> None:
    manifest, k = digits["train"], 7  # k odd: with 2 workers, worker 0 made one batch more
    old = _ranks(manifest, before, workers, buffer)
    read = [key for ld in old for key in _valid(_read(ld, k))]
    assert len(read) == before * k * B and len(set(read)) == len(read)
    new = _ranks(manifest, after, workers, buffer)
    line = _resume(new, old[0].state_dict())
    left = 1438 - len(read)
    assert line is not None and f"its {left} unread samples are re-split over the new layout" in line
    runs = _remainder(new)
    rest = [key for r in runs for key in _valid(r)]
    assert len(rest) == left
    assert sorted(read + rest) == sorted(_all_keys(manifest))  # every sample once: none skipped or repeated
    assert [ld.state_dict()["epoch"] for ld in new] == [0] * after
    if after != 3:
        return
    # then the next epoch, on the new layout, whole
    nxt = [_read(ld) for ld in new]
    assert [len(r) for r in nxt] == [new[0].batches_per_epoch] * after
    assert sorted(key for r in nxt for key in _valid(r)) == sorted(_all_keys(manifest))
    assert {ld.state_dict()["epoch"] for ld in new} == {1} and not new[0].state_dict()["passes"]


def test_resplit_twice_and_an_exact_resume_inside_the_remainder(digits: dict) -> None:
    """2 ranks, late in the epoch -> 3 ranks for 3 batches, checkpointed; resumed on 3 ranks it
    goes on exactly, resumed on 1 rank it re-splits again: every sample once."""
    manifest, workers, buffer = digits["train"], 2, 64
    old = _ranks(manifest, 2, workers, buffer)
    k = old[0].batches_per_epoch - 8
    read = [key for ld in old for key in _valid(_read(ld, k))]
    three = _ranks(manifest, 3, workers, buffer)
    _resume(three, old[0].state_dict())
    reference = _remainder(three)  # uninterrupted
    assert len({key for r in reference for key in _valid(r)} | set(read)) == 1438
    three = _ranks(manifest, 3, workers, buffer)
    _resume(three, old[0].state_dict())
    part = [_read(ld, 3) for ld in three]
    saved = three[0].state_dict()
    assert saved["batches"] == 3 and len(saved["passes"]) == 1
    again = _ranks(manifest, 3, workers, buffer)  # same world size: an exact resume of the remainder
    assert _resume(again, saved) is None
    rest = [_read(ld) for ld in again]
    assert [[b["keys"] for b in p + r] for p, r in zip(part, rest, strict=True)] == [
        [b["keys"] for b in r] for r in reference
    ]
    one = _ranks(manifest, 1, workers, buffer)
    line = _resume(one, saved)
    assert line is not None and "epoch 0 (re-split 1x) was 3 batches into its remainder" in line
    last = [key for r in _remainder(one) for key in _valid(r)]
    mid = [key for r in part for key in _valid(r)]
    assert sorted(read + mid + last) == sorted(_all_keys(manifest))


def test_resampled_mode_and_old_checkpoints_skip_the_rest_of_the_epoch(digits: dict) -> None:
    now = _ranks(digits["train"], 1, 1, 0)[0].state_dict()
    saved = {**now, "world_size": 2, "batches": 5, "batches_per_epoch": 45}
    state, line = data_position({**saved, "mode": "resampled"}, {**now, "mode": "resampled"})
    assert (state["epoch"], state["batches"]) == (1, 0) and line is not None
    assert "resampled has no exact epoch to re-split: its 1280 unread samples are skipped" in line
    old = {k: v for k, v in saved.items() if k not in ("seed", "shuffle_buffer", "total", "passes")}
    state, line = data_position(old, now)
    assert (state["epoch"], state["batches"]) == (1, 0) and "predates epoch re-splitting" in str(line)
    state, line = data_position({**saved, "batches": 0}, now)  # at an epoch boundary: nothing to do
    assert (state["epoch"], state["batches"], state["passes"]) == (0, 0, []), line
    state, line = data_position({**saved, "batches": 45}, now)  # read to its end, not yet moved on
    assert (state["epoch"], state["batches"]) == (1, 0) and "only padding was left" in str(line)
    passes = [{"world_size": 3, "workers": 1, "batch_size": 16, "shuffle_buffer": 0, "batches": 4}]
    state, line = data_position({**saved, "passes": passes, "seed": 4}, now)  # another seed: no replay
    assert (state["epoch"], state["batches"]) == (1, 0) and line == (
        "world size 2 -> 1: epoch 0 (re-split 1x) was 5 batches into its remainder; run.seed or the data "
        "set changed: the rest of its remainder is skipped (never repeated), epoch 1 starts on the new layout"
    )
