"""Making batches in a loader worker: decode, augment, pad and collate one worker's samples.

With ``data.decode: gpu`` a worker decodes nothing: it reads each image's header, draws the same
crop records, and ships the encoded bytes (``jpegs``) for the engine to decode on its device.

A sample that cannot be decoded is replaced in its batch by a padding sample (``valid = False``),
so batch boundaries never shift; see :mod:`mimscale.data.pipeline` for the epoch layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mimscale.data.gpu_decode import header_records
from mimscale.data.reader import (
    MASK,
    PAD,
    SAMPLE,
    SHUFFLE,
    EpochSpec,
    ErrorPolicy,
    range_stream,
    resampled_stream,
    shuffled,
)
from mimscale.data.transforms import augment_sample, check_pixels, render_views
from mimscale.masking import batch_noise, build_mask_generator
from mimscale.targets.bank import pick_view

__all__ = ["IMAGE_KEYS", "EpochDataset"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm")


class EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of one rank from position ``spec.start``; yields whole collated batches."""

    def __init__(self, spec: EpochSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        first = spec.start + (info.id if info is not None else 0)
        if first >= spec.batches_per_epoch:
            return
        worker, b = first % spec.workers, spec.batch_size
        policy = ErrorPolicy(spec.on_error, spec.rank, worker)
        if spec.mode == "resampled":
            stream = resampled_stream(spec, worker, policy)
        else:
            stream = range_stream(spec, worker, policy)
        if spec.mode != "eval":
            stream = shuffled(stream, spec.shuffle_buffer, spec.rng(worker, SHUFFLE))
        head: list[dict[str, Any]] = []  # the worker's first B samples: the padding pool

        def take() -> dict[str, Any] | None:
            sample = next(stream, None)
            if sample is not None and len(head) < b:
                head.append(sample)
            return sample

        for _ in range((first // spec.workers) * b):  # resume: read, never decode
            take()
        # Shard errors met while fast-forwarding were counted by the run that consumed those
        # batches (the same raw reads): count from here on only, so a resumed total is exact.
        policy.count = 0
        masker = None
        if spec.mask is not None:
            grid = (spec.img_size // spec.patch_size,) * 2
            masker = build_mask_generator(spec.mask, grid, spec.img_size, spec.patch_size)
        for index in range(first, spec.batches_per_epoch, spec.workers):
            samples = [take() for _ in range(b)]
            yield self._collate(samples, index, worker, head, policy, masker)

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[Any, ...]:
        """``(images, crop records, targets or None)`` of one sample."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"no image entry (looked for {', '.join(IMAGE_KEYS)}); has {sorted(sample)}")
        spec = self.spec
        check_pixels(sample[key], spec.max_pixels)  # from the header, before any pixel is decoded
        if spec.decode == "gpu":  # header + records only (same draws); pixels on the device
            records, orientation = header_records(sample[key], spec.views, rng)
            return (sample[key], orientation), records, None
        if spec.bank is None:
            return (*augment_sample(sample[key], spec.views, rng, draft=spec.draft), None)
        # Precomputed teacher: replay the bank's view k (its crop and colours) pixel-exactly, so the
        # student sees exactly what the teacher saw; k depends on (seed, epoch, key) only.
        k = pick_view(spec.seed, spec.epoch, sample["__key__"], spec.bank.views_per_image)
        rec = spec.bank.record(sample.get("__url__", ""), sample["__key__"], k)
        replay = rec["replay"]
        images = render_views(sample[key], spec.views, replay, draft=spec.draft)
        return images, replay[:, :7], {n: rec[n] for n in spec.bank.target_fields}

    def _prefetch_targets(self, samples: list[dict[str, Any] | None]) -> None:
        """Start reading the bank records of a batch's samples (the views :meth:`_decode` picks)."""
        spec = self.spec
        for s in samples:
            if s is not None and isinstance(s.get("__key__"), str):
                k = pick_view(spec.seed, spec.epoch, s["__key__"], spec.bank.views_per_image)
                spec.bank.prefetch(s.get("__url__", ""), s["__key__"], k)

    def _sample(self, s: dict[str, Any], rng: np.random.Generator) -> tuple[Any, ...]:
        """``(images, crop records, targets or None, key, label)`` of one sample, checked."""
        return (*self._decode(s, rng), str(s["__key__"]), _label(s))

    def _pad(self, head: list[dict[str, Any]], q: int, worker: int, put: Any) -> None:
        """Write a padding sample for position ``q`` with ``put``: a head sample that decodes and
        fits the batch, or zeros if none does."""
        for t in range(len(head)):
            s = head[(q + t) % len(head)]
            try:
                put(self._sample(s, self.spec.rng(worker, PAD, q)))
                return
            except Exception:  # noqa: BLE001 - already counted when it was first decoded
                continue
        views = self.spec.views
        zeros = (
            (b"", 1)
            if self.spec.decode == "gpu"
            else [np.zeros((3, v.size, v.size), np.uint8) for v in views]
        )
        put((zeros, np.zeros((len(views), 7)), None, "", -1))

    def _collate(
        self,
        samples: list[dict[str, Any] | None],
        index: int,
        worker: int,
        head: list[dict[str, Any]],
        policy: ErrorPolicy,
        masker: Any,
    ) -> dict[str, Any]:
        """Decode, augment and stack one batch; draw its masks (collate runs in the worker)."""
        spec, b = self.spec, len(samples)
        local = index // spec.workers
        gpu = spec.decode == "gpu"
        views = [np.empty((b, 3, v.size, v.size), np.uint8) for v in spec.views] if not gpu else []
        jpegs, orientation = [b""] * b, np.ones(b, np.uint8)
        crops = np.zeros((b, len(spec.views), 7), np.float32)
        labels, keys, valid = np.full(b, -1, np.int64), [""] * b, np.zeros(b, bool)
        targets = spec.bank.empty(b) if spec.bank is not None else None

        def put(i: int, out: tuple[Any, ...]) -> None:
            """Write one sample into row ``i``; raises if it does not fit (padding then rewrites the row)."""
            images, crops[i], row, keys[i], labels[i] = out
            if gpu:
                jpegs[i], orientation[i] = images  # the encoded bytes, their EXIF orientation
            else:
                for v, img in enumerate(images):
                    views[v][i] = img
            if targets is not None and row is not None:
                for name, value in row.items():
                    targets[name][i] = value

        if spec.bank is not None:  # the batch's records load while its images decode
            self._prefetch_targets(samples)
        for i, s in enumerate(samples):
            q = local * b + i  # position in this worker's stream: seeds the sample's augmentation
            if s is not None:
                # Everything one sample can break (decode, label, its targets, writing its row) is
                # inside the guard: any failure is that sample's, skipped and counted, or the run's
                # one-line stop with on_error: fail.
                try:
                    put(i, self._sample(s, spec.rng(worker, SAMPLE, q)))
                    valid[i] = True
                except Exception as e:  # noqa: BLE001 - any bad sample: skip or fail by policy
                    policy.bad_sample(s, e)
            if not valid[i]:
                self._pad(head, q, worker, lambda out, i=i: put(i, out))
        batch: dict[str, Any] = {
            "crops": torch.from_numpy(crops),
            "keys": keys,
            "labels": torch.from_numpy(labels),
            "valid": torch.from_numpy(valid),
            "n_skipped": policy.count,
            "batch_index": index,
        }
        if gpu:  # encoded images; the engine decodes them on its device (gpu_decode.decode_batch)
            batch["jpegs"], batch["orientation"] = jpegs, torch.from_numpy(orientation)
        else:
            batch["views"] = [torch.from_numpy(v) for v in views]
        if targets is not None:  # encoded teacher targets, decoded on the device by the provider
            batch["teacher"] = {name: torch.from_numpy(a) for name, a in targets.items()}
        if masker is not None:
            rng = spec.rng(worker, MASK, local)
            repeats = spec.mask.repeats if spec.mask is not None else 1
            batch["mask"] = torch.from_numpy(np.stack([masker(rng) for _ in range(b * repeats)]))
            # Per sample from (seed, epoch, key): what a method draws its device-side masks from.
            batch["mask_noise"] = batch_noise(spec.seed, spec.epoch, keys, masker.num_patches, repeats)
        return batch


def _label(sample: dict[str, Any]) -> int:
    """The sample's class index (``.cls``), -1 when it has none.

    Raises:
        ValueError: a ``.cls`` that is not an integer in ``[-1, 2**63)`` (it would overflow the
            batch's int64 labels); the message quotes at most 24 bytes of it.
    """
    if "cls" not in sample:
        return -1
    raw = sample["cls"]
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or not -1 <= value < 2**63:
        shown = bytes(raw[:24]) if isinstance(raw, (bytes, bytearray)) else str(raw)[:24]
        raise ValueError(f"label .cls {shown!r} is not a class index (an integer from 0 to 2**63-1)")
    return value


def identity_collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch
