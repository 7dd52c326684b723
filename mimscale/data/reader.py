"""Reading shards: the per-(rank, worker) raw sample streams of one epoch, and the error policy.

This is the part of the pipeline that touches tar files. It knows the epoch layout (which
shards and which positions in them a logical worker reads; see :mod:`mimscale.data.pipeline`)
but not decoding or batching (:mod:`mimscale.data.batches`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mimscale.config import MaskConfig, ViewConfig
from mimscale.data.manifest import ShardSource

__all__ = [
    "EpochSpec",
    "ErrorPolicy",
    "ShardReadError",
    "range_stream",
    "read_shard",
    "resampled_stream",
    "shuffled",
]

# Tags that separate the independent random streams derived from the same (seed, epoch, ...).
ORDER, SHARDS, SHUFFLE, SAMPLE, MASK, PAD = range(6)


class ShardReadError(RuntimeError):
    """A corrupt or unreadable shard or sample with ``data.on_error: fail``; names the shard."""


@dataclass(frozen=True)
class EpochSpec:
    """Everything a worker needs to produce its batches (picklable)."""

    source: ShardSource
    views: tuple[ViewConfig, ...]
    mask: MaskConfig | None
    img_size: int
    patch_size: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank
    mode: Literal["resampled", "exact", "eval"]
    batches_per_epoch: int
    shuffle_buffer: int
    on_error: Literal["skip", "fail"]
    draft: bool
    epoch: int = 0
    start: int = 0  # first global batch index to produce (resume position)

    def rng(self, worker: int, tag: int, index: int = 0) -> np.random.Generator:
        """The generator of one random stream; a pure function of its coordinates."""
        return np.random.default_rng([self.seed % 2**63, self.epoch, self.rank, worker, tag, index])


class ErrorPolicy:
    """WebDataset exception handler: ``skip`` (warn + count) or ``fail`` (raise naming the shard)."""

    def __init__(self, on_error: str, rank: int, worker: int) -> None:
        self.on_error, self.rank, self.worker = on_error, rank, worker
        self.count = 0  # corrupt shards + undecodable samples seen by this worker
        self.url = ""
        self._shard_errors: list[str] = []

    def begin(self, url: str) -> None:
        self.url, self._shard_errors = url, []

    def __call__(self, exn: BaseException) -> bool:
        if self.on_error == "fail":
            raise ShardReadError(
                f"{self.url}: corrupt or truncated shard ({type(exn).__name__}: {exn})"
            ) from exn
        self._shard_errors.append(f"{type(exn).__name__}: {exn}")
        return True  # continue with the next sample / shard

    def end(self) -> None:
        if self._shard_errors:  # one count and one warning per bad shard, however many errors
            self.count += 1
            warnings.warn(
                f"skipping the unreadable rest of shard {self.url} ({self._shard_errors[0]}); "
                f"rank {self.rank} worker {self.worker} skipped {self.count} so far",
                RuntimeWarning,
                stacklevel=2,
            )

    def bad_sample(self, sample: dict[str, Any], exn: BaseException) -> None:
        where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"
        if self.on_error == "fail":
            raise ShardReadError(f"{where} cannot be decoded ({exn})") from exn
        self.count += 1
        warnings.warn(f"{where}: skipped ({exn})", RuntimeWarning, stacklevel=2)


def read_shard(url: str, policy: ErrorPolicy, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes) of one shard, through WebDataset's tar reader.

    A tar cut at a block boundary reads as a shorter, valid archive, so when the manifest
    gives the shard's sample count, a shortfall is reported as a corrupt shard too.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    policy.begin(url)
    try:
        stream = gopen(url)
    except Exception as e:  # noqa: BLE001 - a missing / unreadable shard: skip or fail by policy
        policy(e)
        policy.end()
        return
    got = 0
    try:
        for sample in group_by_keys(
            tar_file_expander([{"url": url, "stream": stream}], handler=policy), handler=policy
        ):
            sample["__url__"] = url
            got += 1
            yield sample
    finally:
        stream.close()
    if expected is not None and got < expected:
        policy(ValueError(f"read {got} samples, the manifest says {expected} (truncated?)"))
    policy.end()


def resampled_stream(spec: EpochSpec, worker: int, policy: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """Infinite stream: shards drawn with replacement by this worker's own generator."""
    rng, urls = spec.rng(worker, SHARDS), spec.source.urls
    empty_in_a_row = 0
    while True:
        got = 0
        k = int(rng.integers(len(urls)))
        counts = spec.source.counts
        for sample in read_shard(urls[k], policy, counts[k] if counts is not None else None):
            got += 1
            yield sample
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row >= max(20, 3 * len(urls)):  # never spin forever on dead shards
            raise ShardReadError(f"no sample could be read from {empty_in_a_row} shard draws in a row")


def _slot_range(total: int, slots: int, slot: int) -> tuple[int, int]:
    return slot * total // slots, (slot + 1) * total // slots


def range_stream(spec: EpochSpec, worker: int, policy: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """This (rank, worker)'s contiguous slice of the epoch's shard sequence (exact / eval)."""
    counts = spec.source.counts
    assert counts is not None
    order = np.arange(len(counts))
    if spec.mode == "exact":  # the same permutation on every rank: no seed from rank/worker
        order = np.random.default_rng([spec.seed % 2**63, spec.epoch, ORDER]).permutation(len(counts))
    slots = spec.world_size * spec.workers
    lo, hi = _slot_range(sum(counts), slots, spec.rank * spec.workers + worker)
    offset = 0
    for k in order:
        n = counts[k]
        if offset < hi and offset + n > lo:
            for pos, sample in enumerate(read_shard(spec.source.urls[k], policy, n)):
                if offset + pos >= hi:
                    break
                if offset + pos >= lo:
                    yield sample
        offset += n


def shuffled(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Seeded shuffle buffer over raw (undecoded) samples."""
    if size <= 1:
        yield from stream
        return
    buf: list[Any] = []
    for item in stream:
        buf.append(item)
        if len(buf) >= size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()
