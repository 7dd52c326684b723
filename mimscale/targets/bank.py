"""The on-disk bank of precomputed teacher targets: manifest, target shards, reading one record.

Layout of a bank directory (written by :mod:`mimscale.targets.precompute`)::

    manifest.json         teacher identity, view config, K, encoding (+ PCA basis), seed, shards
    <image-shard>.tgt     one target shard per image shard (aligned by name), joined by key
    <image-shard>.tgt.json  the shard's completion record (count, bytes, sha256, fidelity)

A target shard is a small header (magic, JSON with the image keys in shard order) followed by
``count * K`` fixed-size records, image-major: record ``(j, k)`` holds view ``k`` of key ``j``:
``replay`` float64 ``[V, 20]`` (crop record + photometric record of every view, replayed
pixel-exactly by :func:`mimscale.data.transforms.render_views`), the encoded teacher tokens
(``codes``, and ``scale`` for int8), ``cls_attn`` float32 ``[N]`` when the teacher gives it, and
``crc`` (crc32 of the record's other bytes), so a corrupt record is found where it is read.
Fixed-size records make reading one view of one image a single ``pread``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mimscale.config import Recipe

__all__ = [
    "FORMAT",
    "BankError",
    "BankReader",
    "bank_identity",
    "file_identity",
    "same_file",
    "target_shard_problems",
    "image_shard_name",
    "pick_view",
    "read_bank_manifest",
    "record_dtype",
    "record_fields",
    "target_file",
]

FORMAT = "mimscale-teacher-targets/1"
MAGIC = b"MIMTGT01"
ALIGN = 64
PICK = 7  # tag of the view-choice stream (distinct from the pipeline's tags)
# A header is JSON with one key per image of the shard (~20 bytes each): 64 MiB is ~3M images,
# far above any shard, and a bound a corrupt length field cannot turn into a MemoryError.
MAX_HEADER = 64 << 20
# Teacher keys that decide what the targets are (the others, like dtype or offload, only how fast).
TEACHER_KEYS = (
    "kind", "model", "pretrained", "layer", "norm", "proj", "cls_attn", "img_size", "resize",
    "mean", "std", "width", "depth", "heads", "patch_size", "out_dim",
)  # fmt: skip


class BankError(RuntimeError):
    """A missing, corrupt or mismatched target shard or record; the message names the file."""


def bank_identity(recipe: Recipe) -> dict[str, Any]:
    """What a bank must agree on with a recipe that trains from it (compared key by key)."""
    t = recipe.teacher
    return {
        "teacher": {k: getattr(t, k) for k in TEACHER_KEYS},
        "model.img_size": recipe.model.img_size,
        "model.patch_size": recipe.model.patch_size,
        "data.views": [asdict(v) for v in recipe.data.views],
        "data.draft": recipe.data.draft,
    }


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a weights file: size, modification time and the sha256 of its bytes."""
    from mimscale.data.manifest import file_sha256

    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def same_file(recorded: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds the bytes :func:`file_identity` recorded. Size and modification
    time alike: taken as the same file (no read); otherwise the bytes are hashed, so a copy
    (new time, same bytes) passes and an overwrite (same size, new bytes) does not."""
    st = os.stat(path)
    if st.st_size != recorded["size"]:
        return False
    if st.st_mtime_ns == recorded["mtime_ns"]:
        return True
    return file_identity(path)["sha256"] == recorded["sha256"]


def record_fields(
    views: int, tokens: int, channels: int, code_dtype: str, code_width: int, int8: bool, cls_attn: int | None
) -> list[list[Any]]:
    """The manifest's ``record`` list ``[name, dtype, shape]`` (crc last) of one stored view.

    Args:
        views: V, views per sample (each replayed from 20 float64).
        tokens: T = 1 + N teacher tokens.
        channels: C_t (unused by the layout; kept for the caller's clarity).
        code_dtype: numpy dtype string of the codes.
        code_width: stored values per token (C_t, or D for PCA).
        int8: codes carry a float32 scale per token.
        cls_attn: N when the teacher's [CLS] attention is stored, else None.
    """
    del channels
    fields: list[list[Any]] = [["replay", "<f8", [views, 20]], ["codes", code_dtype, [tokens, code_width]]]
    if int8:
        fields.append(["scale", "<f4", [tokens]])
    if cls_attn is not None:
        fields.append(["cls_attn", "<f4", [cls_attn]])
    return [*fields, ["crc", "<u4", []]]


def record_dtype(fields: list[list[Any]]) -> np.dtype:
    """The packed record dtype from the manifest's ``record`` list of ``[name, dtype, shape]``."""
    return np.dtype([(name, dt, tuple(shape)) for name, dt, shape in fields])


def image_shard_name(url: str) -> str:
    """The image shard's file name, the join key of its target shard."""
    return os.path.basename(url.rstrip("/"))


def target_file(image_name: str) -> str:
    """Target shard file name of an image shard (``train-000003.tar`` -> ``train-000003.tgt``)."""
    stem = image_name[: -len(".tar")] if image_name.endswith(".tar") else image_name
    return stem + ".tgt"


def key_seed(key: str) -> int:
    """A stable 63-bit integer of a sample key (seeds the per-image generators)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def pick_view(seed: int, epoch: int, key: str, k: int) -> int:
    """Which of the ``k`` stored views of ``key`` an epoch trains on: a pure function of
    (seed, epoch, key), so it does not depend on ranks, workers or a resume."""
    if k == 1:
        return 0
    return int(np.random.default_rng([seed % 2**63, epoch, key_seed(key), PICK]).integers(k))


def read_bank_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """``(bank directory, manifest)`` from a bank directory or its ``manifest.json``.

    Raises:
        BankError: no manifest, not JSON, or not a teacher-target bank (names the file).
    """
    p = Path(path).expanduser()
    file = p if p.name == "manifest.json" or p.is_file() else p / "manifest.json"
    if not file.is_file():
        raise BankError(f"{file}: no target bank manifest (write it with mimscale precompute-targets)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise BankError(f"{file}: unreadable bank manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BankError(f"{file}: not a teacher-target bank (format {FORMAT!r} expected)")
    return file.parent, manifest


def write_shard(path: Path, header: dict[str, Any], records: np.ndarray) -> None:
    """Write one target shard atomically: ``path.partial``, fsync, rename (a partial file never
    has the final name)."""
    head = json.dumps(header, sort_keys=True).encode()
    pre = MAGIC + struct.pack("<Q", len(head)) + head
    pre += b"\0" * (-len(pre) % ALIGN)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(pre)
        f.write(records.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def with_crc(records: np.ndarray) -> np.ndarray:
    """Fill each record's ``crc`` field (crc32 of its other bytes)."""
    raw = records.view(np.uint8).reshape(len(records), -1)
    records["crc"] = [zlib.crc32(row[:-4].tobytes()) for row in raw]
    return records


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, offset of the first record)`` of a target shard.

    Raises:
        BankError: missing file, bad magic, or an unreadable header.
    """
    try:
        with open(path, "rb") as f:
            pre = f.read(len(MAGIC) + 8)
            if len(pre) < len(MAGIC) + 8 or pre[: len(MAGIC)] != MAGIC:
                raise BankError(f"{path}: not a target shard (bad magic)")
            (n,) = struct.unpack("<Q", pre[len(MAGIC) :])
            if n > min(MAX_HEADER, os.fstat(f.fileno()).st_size - len(pre)):
                raise BankError(f"{path}: corrupt target shard header (its length field says {n} bytes)")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
    except OSError as e:
        raise BankError(f"{path}: cannot read target shard ({e.strerror or e})") from None
    except ValueError as e:
        raise BankError(f"{path}: corrupt target shard header ({e})") from None
    start = len(MAGIC) + 8 + n
    return header, start + (-start % ALIGN)


def target_shard_problems(
    path: str | os.PathLike[str], images: set[str] | None = None, digests: bool = True
) -> list[str]:
    """One line per target shard that differs from what the bank's manifest records: missing, of
    another size, an unreadable or inconsistent header, or (``digests``) another sha256. Found
    here, before training, instead of once per sample of the shard.

    Args:
        path: the bank directory or its manifest.
        images: the image shard names a run reads (None: every shard of the bank).
        digests: also hash every target shard (reads the whole bank once).

    Raises:
        BankError: the bank's manifest itself is missing or unreadable.
    """
    from mimscale.data.manifest import file_sha256

    root, manifest = read_bank_manifest(path)
    fields = manifest.get("record")
    itemsize = record_dtype(fields).itemsize if isinstance(fields, list) else None
    out = []
    for s in manifest.get("shards") or []:
        if not isinstance(s, dict) or (images is not None and s.get("image") not in images):
            continue
        f = root / str(s.get("file", ""))
        try:
            size = os.path.getsize(f)
            if size != s.get("nbytes"):
                raise BankError(f"{f}: {size} bytes, the bank's manifest says {s.get('nbytes')} (replaced?)")
            header, start = read_header(f)
            if (header.get("count"), header.get("record_bytes")) != (s.get("count"), itemsize):
                raise BankError(f"{f}: its header disagrees with the bank's manifest (count or record size)")
            if digests and s.get("sha256") and file_sha256(f) != s["sha256"]:
                raise BankError(f"{f}: its sha256 differs from the bank's manifest (changed or replaced)")
        except BankError as e:
            out.append(str(e))
        except OSError as e:
            out.append(f"{f}: cannot read target shard ({e.strerror or e})")
    return out


class _OpenShard:
    def __init__(self, path: Path, dtype: np.dtype, views: int) -> None:
        self.path = path
        header, self.start = read_header(path)
        self.keys = {k: i for i, k in enumerate(header["keys"])}
        self.k, self.itemsize = int(header["views_per_image"]), dtype.itemsize
        if self.k != views or int(header["record_bytes"]) != dtype.itemsize:
            raise BankError(f"{path}: its header disagrees with the bank manifest (K or record size)")
        want = self.start + len(self.keys) * self.k * self.itemsize
        if os.path.getsize(path) != want:
            raise BankError(f"{path}: {os.path.getsize(path)} bytes, {want} expected (truncated?)")
        self.fd = os.open(path, os.O_RDONLY)


class BankReader:
    """Reads one view's record of one image in a loader worker (picklable; files opened lazily).

    Args:
        path: the bank directory or its manifest.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root, manifest = read_bank_manifest(path)
        self.views_per_image = int(manifest["views_per_image"])
        self.dtype = record_dtype(manifest["record"])
        self.target_fields = [n for n in self.dtype.names or () if n not in ("replay", "crc")]
        self._by_image = {s["image"]: s["file"] for s in manifest["shards"]}
        self._image_sha = {s["image"]: s.get("image_sha256") for s in manifest["shards"]}
        self._open: dict[str, _OpenShard] = {}

    def check_images(self, urls: tuple[str, ...], sha256: tuple[str, ...] | None) -> None:
        """The bank covers every image shard and was computed from the same bytes (by sha256, when
        both manifests record it): targets are never paired with other images of the same name.

        Raises:
            BankError: names the first shard that is missing from the bank or differs.
        """
        for i, url in enumerate(urls):
            name = image_shard_name(url)
            if name not in self._by_image:
                raise BankError(f"{self.root}: the bank has no target shard for image shard {name}")
            have, now = self._image_sha.get(name), sha256[i] if sha256 is not None else None
            if have and now and have != now:
                raise BankError(
                    f"{self.root}: image shard {name} has sha256 {now[:12]}..., the bank was computed from "
                    f"{have[:12]}... (other images under the same name); recompute the bank"
                )

    @property
    def shard_names(self) -> set[str]:
        """Names of the image shards the bank covers."""
        return set(self._by_image)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # file descriptors do not travel to workers

    def _shard(self, image_url: str) -> _OpenShard:
        name = image_shard_name(image_url)
        if name not in self._open:
            if name not in self._by_image:
                raise BankError(f"{self.root}: the bank has no target shard for image shard {name}")
            self._open[name] = _OpenShard(self.root / self._by_image[name], self.dtype, self.views_per_image)
        return self._open[name]

    def record(self, image_url: str, key: str, view: int) -> np.void:
        """The record of view ``view`` of sample ``key`` from image shard ``image_url``.

        Raises:
            BankError: no target shard, key not in it, a truncated shard or a failed crc
                (the message names the target shard and the key).
        """
        shard = self._shard(image_url)
        j = shard.keys.get(key)
        if j is None:
            raise BankError(f"{shard.path}: no targets for key {key!r}")
        raw = os.pread(shard.fd, shard.itemsize, shard.start + (j * shard.k + view) * shard.itemsize)
        rec = np.frombuffer(raw, self.dtype)[0] if len(raw) == shard.itemsize else None
        if rec is None or zlib.crc32(raw[:-4]) != int(rec["crc"]):
            raise BankError(f"{shard.path}: corrupt record for key {key!r} view {view} (crc mismatch)")
        return rec

    def prefetch(self, image_url: str, key: str, view: int) -> None:
        """Ask the kernel to start reading one record now (``posix_fadvise(WILLNEED)``, which
        returns at once), so that a batch's records load from disk while its images decode and
        :meth:`record` then reads from the page cache. Problems are left to :meth:`record`."""
        try:
            shard = self._shard(image_url)
        except BankError:
            return
        j = shard.keys.get(key)
        if j is not None and hasattr(os, "posix_fadvise"):
            offset = shard.start + (j * shard.k + view) * shard.itemsize
            os.posix_fadvise(shard.fd, offset, shard.itemsize, os.POSIX_FADV_WILLNEED)

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        """Zero target arrays for a batch (padding rows get zeros; they carry no gradient)."""
        return {n: np.zeros((batch, *self.dtype[n].shape), self.dtype[n].base) for n in self.target_fields}
