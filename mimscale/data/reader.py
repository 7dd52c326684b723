"""Reading shards: the per-(rank, worker) raw sample streams of one epoch, and the error policy.

This is the part of the pipeline that touches tar files. It knows the epoch layout (which
shards and which positions in them a logical worker reads; see :mod:`mimscale.data.pipeline`)
but not decoding or batching (:mod:`mimscale.data.batches`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mimscale.config import MaskConfig, ViewConfig
from mimscale.data.manifest import ShardSource

__all__ = [
    "EpochPass",
    "EpochSpec",
    "ErrorPolicy",
    "ShardEntry",
    "ShardReadError",
    "exact_batches",
    "one_line",
    "range_stream",
    "read_shard",
    "resampled_stream",
    "shard_entry",
    "shuffled",
    "stream_rng",
    "unread_positions",
]

# Tags that separate the independent random streams derived from the same (seed, epoch, ...).
ORDER, SHARDS, SHUFFLE, SAMPLE, MASK, PAD = range(6)


class ShardReadError(RuntimeError):
    """A corrupt or unreadable shard or sample with ``data.on_error: fail``; names the shard."""

    def line(self) -> str:
        """The error as one line, also when a DataLoader re-raised it from a worker: the message
        then holds the worker's whole traceback, whose last line is this error's own (messages are
        made one line where they are raised, :func:`one_line`)."""
        text = str(self).strip()
        if text.startswith("Caught ") and "\n" in text:
            text = text.splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        return text


def one_line(exn: BaseException | str, limit: int = 300) -> str:
    """``exn`` as one bounded line: a message from a hostile file can be long or hold newlines."""
    text = " ".join(str(exn).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    # teacher.source: precomputed: a mimscale.targets.bank.BankReader; each sample replays one of
    # the bank's K stored views (chosen by (seed, epoch, key)) and carries its teacher targets.
    bank: Any = None
    # data.decode: gpu: ship the encoded bytes and crop records; the engine decodes on its device.
    decode: Literal["cpu", "gpu"] = "cpu"
    max_pixels: int = 64_000_000  # data.max_pixels: larger images are skipped (bad samples)
    # exact mode, an epoch re-split after a world-size change: the sorted positions (in the epoch's
    # sample sequence) still to read, an int64 array; None: all of them (the epoch's first layout).
    positions: Any = None
    resplit: int = 0  # how many earlier layouts read part of this epoch (a key of every random stream)

    def rng(self, worker: int, tag: int, index: int = 0) -> np.random.Generator:
        """The generator of one random stream; a pure function of its coordinates."""
        return stream_rng(self.seed, self.epoch, self.rank, worker, tag, index, self.resplit)


def stream_rng(
    seed: int, epoch: int, rank: int, worker: int, tag: int, index: int = 0, resplit: int = 0
) -> np.random.Generator:
    """The generator of one random stream of the loader (:meth:`EpochSpec.rng`). ``resplit > 0``
    (a re-split epoch's later layouts) extends the key, so an epoch's first layout draws as before."""
    key = [seed % 2**63, epoch, rank, worker, tag, index]
    return np.random.default_rng(key + [resplit] if resplit else key)


class ErrorPolicy:
    """WebDataset exception handler: ``skip`` (warn + count) or ``fail`` (raise naming the shard).

    Also judges a shard against its manifest entry (sample count, size, sha256): a mismatch
    is one more problem of that shard, warned and counted once, or an error naming it.
    """

    def __init__(self, on_error: str, rank: int, worker: int) -> None:
        self.on_error, self.rank, self.worker = on_error, rank, worker
        self.count = 0  # bad shards (corrupt or disagreeing with the manifest) + undecodable samples
        self.url = ""
        self._shard_errors: list[str] = []

    def begin(self, url: str) -> None:
        self.url, self._shard_errors = url, []

    @property
    def shard_ok(self) -> bool:
        """No problem seen so far in the current shard."""
        return not self._shard_errors

    def __call__(self, exn: BaseException) -> bool:
        if self.on_error == "fail":
            raise ShardReadError(
                f"{self.url}: corrupt or truncated shard ({type(exn).__name__}: {one_line(exn)})"
            ) from exn
        self._shard_errors.append(f"{type(exn).__name__}: {one_line(exn)}")
        return True  # continue with the next sample / shard

    def mismatch(self, what: str) -> None:
        """The shard disagrees with its manifest entry: fail naming it, or warn and count (skip)."""
        if self.on_error == "fail":
            raise ShardReadError(f"{self.url}: {what}")
        self._shard_errors.append(what)

    def end(self) -> None:
        if self._shard_errors:  # one count and one warning per bad shard, however many errors
            self.count += 1
            warnings.warn(
                f"shard {self.url}: {'; '.join(self._shard_errors[:2])}; its unreadable part is skipped; "
                f"rank {self.rank} worker {self.worker}: {self.count} bad shards/samples so far",
                RuntimeWarning,
                stacklevel=2,
            )

    def bad_sample(self, sample: dict[str, Any], exn: BaseException) -> None:
        where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"
        if self.on_error == "fail":
            raise ShardReadError(f"{where} cannot be decoded ({one_line(exn)})") from exn
        self.count += 1
        warnings.warn(f"{where}: skipped ({one_line(exn)})", RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class ShardEntry:
    """What the manifest says about one shard (each field None when unknown)."""

    count: int | None = None
    nbytes: int | None = None
    sha256: str | None = None  # None also when this reader stops before the shard's end


def shard_entry(source: ShardSource, k: int, verify_digest: bool = True) -> ShardEntry:
    """The manifest's entry of shard ``k`` of ``source``."""
    return ShardEntry(
        count=source.counts[k] if source.counts is not None else None,
        nbytes=source.nbytes[k] if source.nbytes is not None else None,
        sha256=source.sha256[k] if source.sha256 is not None and verify_digest else None,
    )


class _HashingStream:
    """A read-only stream that hashes every byte the tar reader pulls through it."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        return data

    def hexdigest_of_all(self) -> str:
        """Digest of the whole file: reads what the tar reader left (end-of-archive padding)."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()

    def close(self) -> None:
        self.stream.close()


def _local_size(url: str) -> int | None:
    """Size of a local shard file; None for remote or piped urls (or a missing file: gopen says so)."""
    if url.startswith("pipe:") or "://" in url.removeprefix("file://"):
        return None
    try:
        return os.path.getsize(url.removeprefix("file://").removeprefix("file:"))
    except OSError:
        return None


def read_shard(url: str, policy: ErrorPolicy, entry: ShardEntry | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes) of one shard, through WebDataset's tar reader, checked against
    its manifest entry.

    * A tar cut at a block boundary reads as a shorter, valid archive: a shortfall against
      the manifest's count is reported as a corrupt shard.
    * Samples past the manifest's count are never yielded (the epoch layout is built from the
      counts; they would be taken for the next shard's) and the excess is reported.
    * Integrity, cheaply: the file size is compared at open (one ``stat``), and the sha256 is
      computed while the tar streams through and compared at the shard's end, so it costs
      hashing only, no extra read. Readers that stop mid-shard pass no digest.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    entry = entry or ShardEntry()
    policy.begin(url)
    size = _local_size(url) if entry.nbytes is not None else None
    if size is not None and size != entry.nbytes:
        policy.mismatch(f"{size} bytes on disk, the manifest says {entry.nbytes} bytes (another file?)")
        entry = dataclasses.replace(entry, sha256=None)  # one problem, reported once
    try:
        stream = _HashingStream(gopen(url))
    except Exception as e:  # noqa: BLE001 - a missing / unreadable shard: skip or fail by policy
        policy(e)
        policy.end()
        return
    got = extra = 0
    try:
        for sample in group_by_keys(
            tar_file_expander([{"url": url, "stream": stream}], handler=policy), handler=policy
        ):
            if entry.count is not None and got >= entry.count:
                extra += 1
                continue
            sample["__url__"] = url
            got += 1
            yield sample
        if entry.sha256 and policy.shard_ok and stream.hexdigest_of_all() != entry.sha256:
            policy.mismatch("its sha256 differs from the manifest's (the shard was changed or replaced)")
    finally:
        stream.close()
    if entry.count is not None and got < entry.count:
        policy(ValueError(f"read {got} samples, the manifest says {entry.count} (truncated?)"))
    if extra:
        policy.mismatch(
            f"{extra} more samples than the manifest says {entry.count}: they were not read "
            "(the manifest is stale: re-write it with mimscale prep-shards)"
        )
    policy.end()


def resampled_stream(spec: EpochSpec, worker: int, policy: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """Infinite stream: shards drawn with replacement by this worker's own generator."""
    rng, urls = spec.rng(worker, SHARDS), spec.source.urls
    empty_in_a_row = 0
    while True:
        got = 0
        k = int(rng.integers(len(urls)))
        for sample in read_shard(urls[k], policy, shard_entry(spec.source, k)):
            got += 1
            yield sample
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row >= max(20, 3 * len(urls)):  # never spin forever on dead shards
            raise ShardReadError(f"no sample could be read from {empty_in_a_row} shard draws in a row")


def _slot_range(total: int, slots: int, slot: int) -> tuple[int, int]:
    return slot * total // slots, (slot + 1) * total // slots


def exact_batches(n: int, world_size: int, workers: int, batch_size: int) -> int:
    """Batches per rank when ``n`` samples are cut into ``world_size * workers`` contiguous slots:
    the largest slot padded to whole batches (at least one), times the workers."""
    return max(1, math.ceil(math.ceil(n / (world_size * workers)) / batch_size)) * workers


def epoch_order(seed: int, epoch: int, n_shards: int) -> list[int]:
    """The exact mode's shard order of an epoch: the same permutation on every rank."""
    return np.random.default_rng([seed % 2**63, epoch, ORDER]).permutation(n_shards).tolist()


def range_stream(spec: EpochSpec, worker: int, policy: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """This (rank, worker)'s contiguous slice of the epoch's sample sequence (exact / eval): of
    every position, or of ``spec.positions`` (a re-split epoch) where that is set. Only the shards
    holding one of the slice's positions are read."""
    counts = spec.source.counts
    assert counts is not None
    order = list(range(len(counts)))
    if spec.mode == "exact":  # the same permutation on every rank: no seed from rank/worker
        order = epoch_order(spec.seed, spec.epoch, len(counts))
    slots, slot = spec.world_size * spec.workers, spec.rank * spec.workers + worker
    if spec.positions is None:
        wanted = range(*_slot_range(sum(counts), slots, slot))
    else:
        lo, hi = _slot_range(len(spec.positions), slots, slot)
        wanted = spec.positions[lo:hi].tolist()
    yield from _positions_stream(spec, order, wanted, policy)


def _positions_stream(
    spec: EpochSpec, order: list[int], wanted: Sequence[int], policy: ErrorPolicy
) -> Iterator[dict[str, Any]]:
    """The samples at the sorted positions ``wanted`` of the sequence of shards ``order``."""
    counts = spec.source.counts
    assert counts is not None
    i = offset = 0  # wanted[i] is the next position to yield; offset: the shard's first position
    for k in order:
        n = counts[k]
        j = bisect.bisect_left(wanted, offset + n, i)  # wanted[i:j] lie in this shard
        if j > i:
            last = wanted[j - 1]
            # Only the reader that reads up to the shard's end reads all of it: it checks the digest.
            entry = shard_entry(spec.source, k, verify_digest=last == offset + n - 1)
            for pos, sample in enumerate(read_shard(spec.source.urls[k], policy, entry)):
                if offset + pos > last:
                    break
                if offset + pos == wanted[i]:
                    i += 1
                    yield sample
            i = j  # a truncated shard's missing positions are not waited for
        offset += n


@dataclass(frozen=True)
class EpochPass:
    """One layout an exact-mode epoch was read on before the world size changed.

    ``batches`` is what every rank had consumed on it (global batch indices ``0 .. batches-1``).
    """

    world_size: int
    workers: int
    batch_size: int
    shuffle_buffer: int
    batches: int


def _read_by(left: np.ndarray, p: EpochPass, seed: int, epoch: int, resplit: int) -> list[np.ndarray]:
    """The positions of ``left`` that layout ``p`` had emitted, slot by slot.

    Slot ``(r, w)`` reads its contiguous piece of ``left`` through the seeded shuffle buffer and
    makes global batches ``w, w + W, ...`` of ``B`` stream samples each, so after ``k`` batches it
    has emitted the first ``len(range(w, k, W)) * B`` items of its stream (its piece's length at
    most; the rest is padding). Replaying :func:`shuffled` on the positions themselves, with the
    slot's generator, names them: its draws depend on the buffer's fill only, never on the items.
    """
    slots, out = p.world_size * p.workers, []
    for r in range(p.world_size):
        for w in range(p.workers):
            lo, hi = _slot_range(len(left), slots, r * p.workers + w)
            n = min(hi - lo, len(range(w, p.batches, p.workers)) * p.batch_size)
            if n <= 0:
                continue
            rng = stream_rng(seed, epoch, r, w, SHUFFLE, 0, resplit)
            stream = shuffled(iter(left[lo:hi].tolist()), p.shuffle_buffer, rng)
            out.append(np.fromiter(itertools.islice(stream, n), np.int64, n))
    return out


@functools.lru_cache(maxsize=4)
def unread_positions(total: int, seed: int, epoch: int, passes: tuple[EpochPass, ...]) -> np.ndarray:
    """The positions of an exact-mode epoch of ``total`` samples that no layout in ``passes`` read.

    Positions index the epoch's sample sequence (its shards in :func:`epoch_order`, each in its
    own order). ``passes[0]`` read every position; each later one (``resplit = j``) read the rest
    its predecessors left. A pure function of the layouts: no sample is read. Exact while every
    shard holds what its manifest says; a shard found truncated (``on_error: skip``) made its
    reader's stream shorter, so for that reader the replay is off by the missing samples.

    Returns:
        The sorted unread positions (int64; read-only, the result is cached).
    """
    left = np.arange(total, dtype=np.int64)
    for j, p in enumerate(passes):
        read = _read_by(left, p, seed, epoch, j)
        if read:
            left = np.setdiff1d(left, np.concatenate(read), assume_unique=True)
    left.flags.writeable = False
    return left


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
