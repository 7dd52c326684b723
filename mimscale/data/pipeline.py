"""The WebDataset input pipeline: shards -> decoded, augmented, masked uint8 batches.

How an epoch is laid out (this is what makes it deterministic and resumable):

* A rank runs ``W = max(1, data.num_workers)`` *logical workers*. Global batch ``i`` of an epoch
  on a rank is made by logical worker ``i % W`` as its local batch ``i // W``. Each batch is
  built in one worker from ``B`` consecutive samples of that worker's sample stream, so batch
  ``i`` is a pure function of (seed, epoch, rank, logical worker, local batch index).
* The torch DataLoader hands batches out round-robin over its workers, in order. To resume at
  batch ``k``, DataLoader worker ``j`` plays logical worker ``(k + j) % W`` and skips its first
  ``(k + j) // W`` batches by reading (never decoding) the raw samples; so the next batches are
  exactly ``k, k+1, ...``. Every batch carries ``batch_index`` and the loader checks it.
* Every sample's augmentation draws from its own generator seeded by (seed, epoch, rank,
  worker, position in the stream), and each batch's masks from one seeded by (..., batch), so
  skipping costs no decoding and replays identically.
* A sample that cannot be decoded is replaced in its batch by a *padding* sample (a copy of one
  of the worker's first samples, ``valid = False``), so batch boundaries never shift: the
  position stays a pure count of raw samples.

Epoch modes:

``resampled``
    Each logical worker draws shards with replacement from its own seeded generator: an
    infinite stream cut into ``samples_per_epoch // (world_size * B)`` batches per rank.
``exact``
    Per epoch the shard order is shuffled (same on every rank), the concatenated sample
    sequence is cut into ``world_size * W`` contiguous ranges of equal size (+-1), one per
    (rank, logical worker). Every sample is seen exactly once per epoch. **We pad, never drop**:
    every worker yields ``ceil(ceil(total / (world_size * W)) / B)`` batches; positions past the
    end of its range are padding samples with ``valid = False``, so every rank yields the same
    number of batches and no job can hang on uneven shards. Needs per-shard counts (a manifest)
    and at least one shard per reader.

The evaluation loader uses the ``exact`` layout without shuffling or augmentation (a center
crop), so features for kNN / linear probes cover every sample exactly once across ranks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mimscale.config import DataConfig, MaskConfig, ViewConfig
from mimscale.data.manifest import ShardSource, resolve_source
from mimscale.data.transforms import augment_sample
from mimscale.masking import build_mask_generator

__all__ = ["ShardLoader", "ShardReadError", "TrainLoader", "build_eval_loader", "build_train_loader"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm")
# Tags that separate the independent random streams derived from the same (seed, epoch, ...).
_ORDER, _SHARDS, _SHUFFLE, _SAMPLE, _MASK, _PAD = range(6)


class ShardReadError(RuntimeError):
    """A corrupt or unreadable shard or sample with ``data.on_error: fail``; names the shard."""


@dataclass(frozen=True)
class _Spec:
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


class _ErrorPolicy:
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


def _read_shard(url: str, policy: _ErrorPolicy, expected: int | None = None) -> Iterator[dict[str, Any]]:
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


def _resampled_stream(spec: _Spec, worker: int, policy: _ErrorPolicy) -> Iterator[dict[str, Any]]:
    """Infinite stream: shards drawn with replacement by this worker's own generator."""
    rng, urls = spec.rng(worker, _SHARDS), spec.source.urls
    empty_in_a_row = 0
    while True:
        got = 0
        k = int(rng.integers(len(urls)))
        counts = spec.source.counts
        for sample in _read_shard(urls[k], policy, counts[k] if counts is not None else None):
            got += 1
            yield sample
        empty_in_a_row = 0 if got else empty_in_a_row + 1
        if empty_in_a_row >= max(20, 3 * len(urls)):  # never spin forever on dead shards
            raise ShardReadError(f"no sample could be read from {empty_in_a_row} shard draws in a row")


def _slot_range(total: int, slots: int, slot: int) -> tuple[int, int]:
    return slot * total // slots, (slot + 1) * total // slots


def _range_stream(spec: _Spec, worker: int, policy: _ErrorPolicy) -> Iterator[dict[str, Any]]:
    """This (rank, worker)'s contiguous slice of the epoch's shard sequence (exact / eval)."""
    counts = spec.source.counts
    assert counts is not None
    order = np.arange(len(counts))
    if spec.mode == "exact":  # the same permutation on every rank: no seed from rank/worker
        order = np.random.default_rng([spec.seed % 2**63, spec.epoch, _ORDER]).permutation(len(counts))
    slots = spec.world_size * spec.workers
    lo, hi = _slot_range(sum(counts), slots, spec.rank * spec.workers + worker)
    offset = 0
    for k in order:
        n = counts[k]
        if offset < hi and offset + n > lo:
            for pos, sample in enumerate(_read_shard(spec.source.urls[k], policy, n)):
                if offset + pos >= hi:
                    break
                if offset + pos >= lo:
                    yield sample
        offset += n


def _shuffled(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
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


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of one rank from position ``spec.start``; yields whole collated batches."""

    def __init__(self, spec: _Spec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        first = spec.start + (info.id if info is not None else 0)
        if first >= spec.batches_per_epoch:
            return
        worker, b = first % spec.workers, spec.batch_size
        policy = _ErrorPolicy(spec.on_error, spec.rank, worker)
        if spec.mode == "resampled":
            stream = _resampled_stream(spec, worker, policy)
        else:
            stream = _range_stream(spec, worker, policy)
        if spec.mode != "eval":
            stream = _shuffled(stream, spec.shuffle_buffer, spec.rng(worker, _SHUFFLE))
        head: list[dict[str, Any]] = []  # the worker's first B samples: the padding pool

        def take() -> dict[str, Any] | None:
            sample = next(stream, None)
            if sample is not None and len(head) < b:
                head.append(sample)
            return sample

        for _ in range((first // spec.workers) * b):  # resume: read, never decode
            take()
        masker = None
        if spec.mask is not None:
            grid = (spec.img_size // spec.patch_size,) * 2
            masker = build_mask_generator(spec.mask, grid, spec.img_size, spec.patch_size)
        for index in range(first, spec.batches_per_epoch, spec.workers):
            samples = [take() for _ in range(b)]
            yield self._collate(samples, index, worker, head, policy, masker)

    def _decode(
        self, sample: dict[str, Any], rng: np.random.Generator
    ) -> tuple[list[np.ndarray], np.ndarray]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"no image entry (looked for {', '.join(IMAGE_KEYS)}); has {sorted(sample)}")
        return augment_sample(sample[key], self.spec.views, rng, draft=self.spec.draft)

    def _pad(self, head: list[dict[str, Any]], q: int, worker: int) -> tuple[Any, ...]:
        """A padding sample for position ``q``: a decodable head sample, or zeros if none is."""
        for t in range(len(head)):
            s = head[(q + t) % len(head)]
            try:
                return (*self._decode(s, self.spec.rng(worker, _PAD, q)), s["__key__"], _label(s))
            except Exception:  # noqa: BLE001 - already counted when it was first decoded
                continue
        zeros = [np.zeros((3, v.size, v.size), np.uint8) for v in self.spec.views]
        return zeros, np.zeros((len(self.spec.views), 7)), "", -1

    def _collate(
        self,
        samples: list[dict[str, Any] | None],
        index: int,
        worker: int,
        head: list[dict[str, Any]],
        policy: _ErrorPolicy,
        masker: Any,
    ) -> dict[str, Any]:
        """Decode, augment and stack one batch; draw its masks (collate runs in the worker)."""
        spec, b = self.spec, len(samples)
        local = index // spec.workers
        views = [np.empty((b, 3, v.size, v.size), np.uint8) for v in spec.views]
        crops = np.zeros((b, len(spec.views), 7), np.float32)
        labels, keys, valid = np.full(b, -1, np.int64), [""] * b, np.zeros(b, bool)
        for i, s in enumerate(samples):
            q = local * b + i  # position in this worker's stream: seeds the sample's augmentation
            out = None
            if s is not None:
                try:
                    out = (*self._decode(s, spec.rng(worker, _SAMPLE, q)), s["__key__"], _label(s))
                    valid[i] = True
                except Exception as e:  # noqa: BLE001 - any undecodable sample: skip or fail by policy
                    policy.bad_sample(s, e)
            if out is None:
                out = self._pad(head, q, worker)
            images, crops[i], keys[i], labels[i] = out
            for v, img in enumerate(images):
                views[v][i] = img
        batch: dict[str, Any] = {
            "views": [torch.from_numpy(v) for v in views],
            "crops": torch.from_numpy(crops),
            "keys": keys,
            "labels": torch.from_numpy(labels),
            "valid": torch.from_numpy(valid),
            "n_skipped": policy.count,
            "batch_index": index,
        }
        if masker is not None:
            rng = spec.rng(worker, _MASK, local)
            repeats = spec.mask.repeats if spec.mask is not None else 1
            batch["mask"] = torch.from_numpy(np.stack([masker(rng) for _ in range(b * repeats)]))
        return batch


def _label(sample: dict[str, Any]) -> int:
    return int(sample["cls"]) if "cls" in sample else -1


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers outlive SIGTERM / SIGUSR1 sent to the whole process tree (a scheduler, a launcher):
    the training process finishes its step and saves (engine/distributed.py StopRequest), then
    closes the loader. SIGTERM from the training process itself (its shutdown) still ends the
    worker: a thread reads the sender of each SIGTERM, which stays blocked everywhere else."""
    import os
    import signal
    import threading

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait_for_parent() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent, daemon=True).start()


class ShardLoader:
    """An epoch-aware, resumable iterator over batches (the engine's data interface).

    Batch dict:
        ``views``: list (one per view) of uint8 ``[B, 3, H_v, W_v]``;
        ``crops``: float32 ``[B, V, 7]`` records ``(src_h, src_w, top, left, h, w, flip)``;
        ``keys``: list of B sample keys; ``labels``: int64 ``[B]`` (-1 when unlabeled);
        ``valid``: bool ``[B]`` (False for padding samples: exact-mode tail, undecodable);
        ``mask``: bool ``[B * R, N]`` (``True = masked``; rows ``b*R .. b*R+R-1`` belong to
        sample ``b``; absent for ``mask.kind: none``);
        ``n_skipped``: corrupt shards + samples skipped so far by the worker that made it;
        ``batch_index``: the batch's index within the epoch.

    Attributes:
        batches_per_epoch: batches per epoch on this rank (equal on all ranks).
    """

    def __init__(self, spec: _Spec, num_workers: int) -> None:
        self._spec = spec
        self._num_workers = num_workers
        self.batches_per_epoch = spec.batches_per_epoch
        self._epoch, self._pos = 0, 0
        self._pinned = False  # set_epoch / load_state_dict fixed the epoch for the next iter()
        self._active: Iterator[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run ``epoch``.

        A new epoch starts at batch 0; the current epoch keeps its position, so calling
        ``set_epoch(e)`` after ``load_state_dict`` resumes mid-epoch, and an epoch that was
        already finished yields nothing. Without any call, each ``iter()`` after a finished
        epoch moves on to the next one by itself.
        """
        if epoch != self._epoch:
            self._epoch, self._pos = int(epoch), 0
        self._pinned = True

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches consumed in it (plus the layout it depends on)."""
        s = self._spec
        return {
            "epoch": self._epoch,
            "batches": self._pos,
            "batches_per_epoch": self.batches_per_epoch,
            "world_size": s.world_size,
            "workers": s.workers,
            "batch_size": s.batch_size,
            "mode": s.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; the next ``iter()`` yields exactly the remaining batches.

        Raises:
            ValueError: the saved layout (world size, workers, batch size, mode, epoch length)
                differs, so a mid-epoch position would not map to the same samples.
        """
        mine = self.state_dict()
        for k in ("batches_per_epoch", "world_size", "workers", "batch_size", "mode"):
            if k in state and state[k] != mine[k]:
                raise ValueError(
                    f"data loader state: {k}={state[k]} was saved but this run has {k}={mine[k]}; "
                    "an exact mid-epoch resume needs the same world size, data.num_workers, batch and data"
                )
        self._epoch, self._pos = int(state["epoch"]), int(state["batches"])
        self._pinned = True

    def close(self) -> None:
        """Shut down the workers of the current iteration (the position is kept)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._active is not None:
            self._active.close()  # shuts down the workers of an abandoned iteration
        if self._pos >= self.batches_per_epoch and not self._pinned:  # finished: move on
            self._epoch, self._pos = self._epoch + 1, 0
        self._pinned = False
        self._active = self._iterate()
        return self._active

    def _iterate(self) -> Iterator[dict[str, Any]]:
        spec = dataclasses.replace(self._spec, epoch=self._epoch, start=self._pos)
        dataset = _EpochDataset(spec)
        remaining = self.batches_per_epoch - self._pos
        workers = min(self._num_workers, remaining)
        if workers == 0:
            source: Any = iter(dataset)
        else:
            source = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                collate_fn=_identity,
                persistent_workers=False,  # workers restart each epoch with the new position
                pin_memory=torch.cuda.is_available(),  # the engine copies batches to the GPU
                # Its own generator: without one, creating the iterator draws from the global
                # torch RNG, which a resumed run would see at a different point (drop-path).
                generator=torch.Generator(),
                worker_init_fn=_ignore_stop_signals,
            )
        for batch in source:
            if batch["batch_index"] != self._pos:  # the round-robin contract was broken
                raise RuntimeError(
                    f"data loader out of order: got batch {batch['batch_index']}, want {self._pos}"
                )
            self._pos += 1
            yield batch


TrainLoader = ShardLoader


def _exact_batches(source: ShardSource, world_size: int, workers: int, batch_size: int) -> int:
    """Batches per logical worker in exact layout: the largest slice, padded to whole batches."""
    assert source.total is not None
    return max(1, math.ceil(math.ceil(source.total / (world_size * workers)) / batch_size))


def build_train_loader(
    data: DataConfig,
    mask: MaskConfig,
    *,
    img_size: int,
    patch_size: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
) -> ShardLoader:
    """The training loader of one rank.

    Args:
        data: the recipe's data section (``train`` source, epoch mode, workers, views, ...).
        mask: the recipe's mask section; ``kind: none`` gives batches without ``mask``.
        img_size: encoder input size (the mask grid is ``img_size // patch_size`` squared).
        patch_size: ViT patch size.
        batch_size: per-rank micro batch.
        seed: run seed.
        rank: this rank.
        world_size: number of ranks.

    Returns:
        A :class:`ShardLoader` with ``batches_per_epoch`` equal on every rank:
        ``samples_per_epoch // (world_size * batch_size)`` in ``resampled`` mode (default
        ``samples_per_epoch``: the manifest's total); in ``exact`` mode the whole data set padded
        to whole batches per worker (``samples_per_epoch`` is not used).

    Raises:
        ValueError: the epoch length is unknown (a bare pattern without ``samples_per_epoch``),
            too few samples for one batch, or fewer shards than readers in ``exact`` mode.
    """
    source = resolve_source(data.train)
    workers = max(1, data.num_workers)
    if data.epoch_mode == "resampled":
        n = data.samples_per_epoch or source.total
        if n is None:
            raise ValueError(
                f"data.train={data.train!r} has no manifest, so the epoch length is unknown: set "
                "data.samples_per_epoch, or point data.train at the shards' manifest.json"
            )
        bpe = n // (world_size * batch_size)
        if bpe < 1:
            raise ValueError(
                f"{n} samples per epoch is less than one batch of {batch_size} x {world_size} ranks"
            )
    else:
        _check_exact(data, source, world_size, workers)
        bpe = _exact_batches(source, world_size, workers, batch_size) * workers
    spec = _Spec(
        source=source,
        views=tuple(data.views),
        mask=None if mask.kind == "none" else mask,
        img_size=img_size,
        patch_size=patch_size,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=workers,
        mode=data.epoch_mode,
        batches_per_epoch=bpe,
        shuffle_buffer=data.shuffle_buffer,
        on_error=data.on_error,
        draft=data.draft,
    )
    return ShardLoader(spec, data.num_workers)


def _check_exact(data: DataConfig, source: ShardSource, world_size: int, workers: int) -> None:
    if source.counts is None:
        raise ValueError(
            f"data.epoch_mode=exact needs per-shard sample counts: point data.train ({data.train!r}) at "
            "the shards' manifest.json (written by data_prep/make_shards.py)"
        )
    readers = world_size * workers
    nonempty = sum(1 for c in source.counts if c > 0)
    if nonempty < readers:
        raise ValueError(
            f"data.epoch_mode=exact: {nonempty} shards for {world_size} ranks x {workers} workers = "
            f"{readers} readers; every reader needs a shard of its own. Write smaller shards "
            f"(make_shards --shard-size), lower data.num_workers, or use data.epoch_mode=resampled"
        )


def build_eval_loader(
    data: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    source: str | None = None,
) -> ShardLoader:
    """A deterministic evaluation loader: every sample exactly once across ranks, center crop.

    Images are resized so a ``0.875`` center crop lands on ``img_size`` (resize 256 /
    crop 224), no other augmentation, no masks. Padding samples have ``valid = False``; drop
    them (e.g. ``feats[batch["valid"]]``) before kNN or linear probing.

    Args:
        data: the recipe's data section (``val``, ``num_workers``, ``draft``, interpolation of
            the first view).
        img_size: output size.
        batch_size: per-rank batch.
        rank: this rank.
        world_size: number of ranks.
        source: shards to read instead of ``data.val`` (e.g. ``data.train`` for a kNN bank).

    Returns:
        A :class:`ShardLoader`; every rank gets the same ``batches_per_epoch``.
    """
    spec_text = data.val if source is None else source
    src = resolve_source(spec_text)
    if src.total is None:
        raise ValueError(
            f"evaluation needs per-shard counts: point {spec_text!r} at the shards' manifest.json"
        )
    # More readers than samples would only make padding: cap the workers at what has data.
    workers = max(1, min(data.num_workers, math.ceil(src.total / (world_size * batch_size))))
    view = ViewConfig(size=img_size, crop="center", hflip=0.0, interpolation=data.views[0].interpolation)
    spec = _Spec(
        source=src,
        views=(view,),
        mask=None,
        img_size=img_size,
        patch_size=1,
        batch_size=batch_size,
        seed=0,
        rank=rank,
        world_size=world_size,
        workers=workers,
        mode="eval",
        batches_per_epoch=_exact_batches(src, world_size, workers, batch_size) * workers,
        shuffle_buffer=0,
        on_error=data.on_error,
        draft=data.draft,
    )
    return ShardLoader(spec, workers if data.num_workers > 0 else 0)
