"""The WebDataset input pipeline: shards -> decoded, augmented, masked uint8 batches.

This module holds the loader (its position, resume state and epoch length) and the builders;
reading shards is :mod:`mimscale.data.reader`, making batches in a worker :mod:`mimscale.data.batches`.

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

Re-splitting an epoch (``exact`` mode, a resume on another world size): which samples the old
layout read is a pure function of that layout and its batch count (each slot's range through its
seeded shuffle buffer; :func:`~mimscale.data.reader.unread_positions` replays it on the
positions, reading no sample). The unread positions, sorted, are read once more as a
*remainder* of the same epoch: cut into ``world_size * W`` contiguous pieces on the new layout,
each shuffled, batched and padded exactly as above (so ranks still yield equal batch counts),
and then the next epoch starts as usual. The loader state records the earlier layouts
(``passes``), so a checkpoint inside a remainder resumes exactly, and a further change of world
size re-splits what is still unread. ``resampled`` epochs have no exact content: a world-size
change skips the rest of the epoch (:func:`mimscale.engine.checkpoint.data_position`).

The evaluation loader uses the ``exact`` layout without shuffling or augmentation (a center
crop), so features for kNN / linear probes cover every sample exactly once across ranks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from mimscale.config import DataConfig, MaskConfig, ViewConfig
from mimscale.data.batches import EpochDataset, identity_collate
from mimscale.data.manifest import ShardSource, resolve_source
from mimscale.data.reader import (
    EpochPass,
    EpochSpec,
    ShardReadError,
    exact_batches,
    one_line,
    unread_positions,
)

__all__ = ["ShardLoader", "ShardReadError", "TrainLoader", "build_eval_loader", "build_train_loader"]


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
        ``views``: list (one per view) of uint8 ``[B, 3, H_v, W_v]``; with ``data.decode: gpu``
        instead ``jpegs`` (B encoded images), ``orientation`` (uint8 ``[B]``, EXIF) and ``device_decode``
        (:class:`~mimscale.data.gpu_decode.DeviceDecode`): the engine's ``prepare_batch`` makes
        ``views`` on its device (:func:`~mimscale.data.gpu_decode.decode_batch`);
        ``crops``: float32 ``[B, V, 7]`` records ``(src_h, src_w, top, left, h, w, flip)``;
        ``keys``: list of B sample keys; ``labels``: int64 ``[B]`` (-1 when unlabeled);
        ``valid``: bool ``[B]`` (False for padding samples: exact-mode tail, undecodable);
        ``mask``: bool ``[B * R, N]`` (``True = masked``; rows ``b*R .. b*R+R-1`` belong to
        sample ``b``; absent for ``mask.kind: none``);
        ``n_skipped``: bad shards + samples skipped so far in this iteration by the worker that
        made it (the rank's exact total is :attr:`ShardLoader.shard_errors`);
        ``batch_index``: the batch's index within the epoch.

    Attributes:
        batches_per_epoch: batches per epoch on this rank (equal on all ranks); a re-split epoch's
            remainder has its own count (:attr:`epoch_batches`).
        shard_errors: bad shards + skipped samples in the batches this rank consumed, over all
            workers and epochs (kept in the state, so exact across resumes); sum it over ranks.
            With ``data.decode: gpu`` it also counts the samples no decoder could read on the
            device side (:meth:`bad_on_device`), in the same state entry.
    """

    def __init__(self, spec: EpochSpec, num_workers: int) -> None:
        self._spec = spec
        self._num_workers = num_workers
        self.batches_per_epoch = spec.batches_per_epoch
        self._epoch, self._pos = 0, 0
        self._passes: tuple[EpochPass, ...] = ()  # earlier layouts of this epoch (a re-split, exact mode)
        self._pinned = False  # set_epoch / load_state_dict fixed the epoch for the next iter()
        # Workers report cumulative counts per iteration: the latest per logical worker, plus
        # the totals of finished iterations.
        self._errors_before = 0
        self._errors_now: dict[int, int] = {}
        self._device_errors = 0  # data.decode: gpu: bad samples found when the engine decoded them
        self._active: Any = None  # the current iteration (a generator: closed to stop workers)
        self._device_job: Any = None
        if spec.decode == "gpu":
            from mimscale.data.gpu_decode import DeviceDecode

            self._device_job = DeviceDecode(spec.views, self.bad_on_device)

    @property
    def spec(self) -> EpochSpec:
        """The layout this loader was built with (views, masks, decode, bank, seed)."""
        return self._spec

    @property
    def shard_errors(self) -> int:
        """Bad shards + skipped samples of the consumed batches (this rank, all workers/epochs)."""
        return self._errors_before + sum(self._errors_now.values()) + self._device_errors

    def bad_on_device(self, key: str, exn: BaseException) -> None:
        """A sample of a consumed batch that no decoder could read (``data.decode: gpu``): warned
        and counted in :attr:`shard_errors`, as a worker counts one; ``on_error: fail`` raises."""
        if self._spec.on_error == "fail":
            raise ShardReadError(f"sample {key!r} cannot be decoded ({one_line(exn)})") from exn
        self._device_errors += 1
        warnings.warn(f"sample {key!r}: skipped ({exn})", RuntimeWarning, stacklevel=2)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch_batches(self) -> int:
        """Batches of the current epoch on this rank: :attr:`batches_per_epoch`, or for a re-split
        epoch those of its remainder (its unread samples on this layout, padded alike)."""
        if not self._passes:
            return self.batches_per_epoch
        s = self._spec
        return exact_batches(len(self._unread()), s.world_size, s.workers, s.batch_size)

    def _unread(self) -> Any:
        """A re-split epoch's positions still to read (sorted int64 array)."""
        s = self._spec
        assert s.source.total is not None
        return unread_positions(s.source.total, s.seed, self._epoch, self._passes)

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
            self._epoch, self._pos, self._passes = int(epoch), 0, ()
        self._pinned = True

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches consumed in it (plus the layout it depends on: with
        ``seed``, ``shuffle_buffer`` and ``total`` another world size can re-split the epoch, and
        ``passes`` lists the earlier layouts of a re-split epoch, whose remainder ``batches`` counts in)."""
        s = self._spec
        return {
            "epoch": self._epoch,
            "batches": self._pos,
            "batches_per_epoch": self.batches_per_epoch,
            "world_size": s.world_size,
            "workers": s.workers,
            "batch_size": s.batch_size,
            "mode": s.mode,
            "shard_errors": self.shard_errors,
            "seed": s.seed,
            "shuffle_buffer": s.shuffle_buffer,
            "total": s.source.total,
            "passes": [dataclasses.asdict(p) for p in self._passes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; the next ``iter()`` yields exactly the remaining batches.

        Raises:
            ValueError: the saved layout (world size, workers, batch size, mode, epoch length;
                for a re-split epoch also the seed and the data set's size) differs, so a
                mid-epoch position would not map to the same samples.
        """
        mine = self.state_dict()
        passes = tuple(EpochPass(**p) for p in state.get("passes", ()))
        keys = ["batches_per_epoch", "world_size", "workers", "batch_size", "mode"]
        for k in keys + (["seed", "total"] if passes else []):  # a re-split replays the seed's order
            if state.get(k, mine[k] if k in keys else None) != mine[k]:
                raise ValueError(
                    f"data loader state: {k}={state.get(k)} was saved but this run has {k}={mine[k]}; "
                    "an exact mid-epoch resume needs the same world size, data.num_workers, batch and data"
                )
        self._epoch, self._pos, self._passes = int(state["epoch"]), int(state["batches"]), passes
        self._errors_before, self._errors_now = int(state.get("shard_errors", 0)), {}
        self._device_errors = 0  # included in the saved total
        self._pinned = True

    def close(self) -> None:
        """Shut down the workers of the current iteration (the position is kept)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._active is not None:
            self._active.close()  # shuts down the workers of an abandoned iteration
        if self._pos >= self.epoch_batches and not self._pinned:  # finished: move on
            self._epoch, self._pos, self._passes = self._epoch + 1, 0, ()
        self._pinned = False
        self._errors_before += sum(self._errors_now.values())  # the new workers count from zero
        self._errors_now = {}
        self._active = self._iterate()
        return self._active

    def _iterate(self) -> Iterator[dict[str, Any]]:
        spec = dataclasses.replace(self._spec, epoch=self._epoch, start=self._pos)
        if self._passes:  # the remainder of a re-split epoch
            bpe, resplit = self.epoch_batches, len(self._passes)
            spec = dataclasses.replace(spec, positions=self._unread(), resplit=resplit, batches_per_epoch=bpe)
        dataset = EpochDataset(spec)
        remaining = spec.batches_per_epoch - self._pos
        workers = min(self._num_workers, remaining)
        if workers == 0:
            source: Any = iter(dataset)
        else:
            source = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                collate_fn=identity_collate,  # type: ignore[arg-type]  # batch_size=None: one item
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
            self._errors_now[batch["batch_index"] % self._spec.workers] = int(batch["n_skipped"])
            if self._device_job is not None:
                batch["device_decode"] = self._device_job
            yield batch


TrainLoader = ShardLoader


def _exact_batches(source: ShardSource, world_size: int, workers: int, batch_size: int) -> int:
    """Batches per rank in exact layout: the largest slice, padded to whole batches, times the workers."""
    assert source.total is not None
    return exact_batches(source.total, world_size, workers, batch_size)


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
    bank: str | None = None,
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
        bank: a precomputed teacher-target bank (``teacher.source: precomputed``): every sample
            replays one of the bank's stored views and its batch carries ``teacher`` (the encoded
            targets, see :class:`mimscale.targets.bank.BankReader`).

    Returns:
        A :class:`ShardLoader` with ``batches_per_epoch`` equal on every rank:
        ``samples_per_epoch // (world_size * batch_size)`` in ``resampled`` mode (default
        ``samples_per_epoch``: the manifest's total); in ``exact`` mode the whole data set padded
        to whole batches per worker (``samples_per_epoch`` is not used).

    Raises:
        ValueError: the epoch length is unknown (a bare pattern without ``samples_per_epoch``),
            too few samples for one batch, or fewer shards than readers in ``exact`` mode.
        FileNotFoundError: nothing at ``data.train`` (one line naming the key and the path).
    """
    if data.decode == "gpu":  # recipes are checked earlier (mimscale.data.check); code callers here
        from mimscale.data.gpu_decode import check_views

        check_views(data.views)
        if bank:
            raise ValueError("data.decode=gpu: a precomputed teacher's views are replayed on the CPU")
    source = _resolve(data.train, "data.train")
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
        bpe = _exact_batches(source, world_size, workers, batch_size)
    spec = EpochSpec(
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
        bank=_bank_reader(bank, source) if bank else None,
        decode=data.decode,
        max_pixels=data.max_pixels,
    )
    return ShardLoader(spec, data.num_workers)


def _bank_reader(bank: str, source: ShardSource) -> Any:
    """The bank's reader, checked to cover every image shard of ``data.train``, same bytes."""
    from mimscale.targets.bank import BankError, BankReader

    reader = BankReader(bank)
    try:
        reader.check_images(source.urls, source.sha256)
    except BankError as e:
        raise ValueError(f"teacher.bank: {e}") from None
    return reader


def _resolve(spec: str, key: str) -> ShardSource:
    """:func:`resolve_source`, with a missing path reported as one line naming the recipe key."""
    try:
        return resolve_source(spec)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}") from None


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
    where = data.val if source is None else source
    key = "data.val" if source is None else "data.train" if source == data.train else "source"
    shards = _resolve(where, key)
    if shards.total is None:
        raise ValueError(f"evaluation needs per-shard counts: point {where!r} at the shards' manifest.json")
    # More readers than samples would only make padding: cap the workers at what has data.
    workers = max(1, min(data.num_workers, math.ceil(shards.total / (world_size * batch_size))))
    view = ViewConfig(size=img_size, crop="center", hflip=0.0, interpolation=data.views[0].interpolation)
    spec = EpochSpec(
        source=shards,
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
        batches_per_epoch=_exact_batches(shards, world_size, workers, batch_size),
        shuffle_buffer=0,
        on_error=data.on_error,
        draft=data.draft,
        max_pixels=data.max_pixels,
    )
    return ShardLoader(spec, workers if data.num_workers > 0 else 0)
