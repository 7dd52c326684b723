"""Write one shard: encode (check, optionally pre-resize) each image, then tar it atomically.

A shard is written under a temporary name, its record is stored in ``.parts/``, and only then is
the tar renamed: a truncated shard never carries a final name. Tar headers use a fixed
mtime/owner, so the same input always gives byte-identical shards. Runs in the writer processes
of :func:`mimscale.data.shards.make_shards`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mimscale.data.manifest import file_sha256
from mimscale.data.shard_plan import SourceItem
from mimscale.data.transforms import oriented_size, to_rgb

# PIL format -> extension under which the original bytes are stored (readers key on it).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
PARTS = ".parts"


# --------------------------------------------------------------------------- encoding


def _target_size(w: int, h: int, max_side: int | None, short_side: int | None) -> tuple[int, int] | None:
    """Downscaled size for pre-resizing, or None when the image is already small enough."""
    scale = 1.0
    if max_side and max(w, h) > max_side:
        scale = min(scale, max_side / max(w, h))
    if short_side and min(w, h) > short_side:
        scale = min(scale, short_side / min(w, h))
    if scale >= 1.0:
        return None
    return max(1, round(w * scale)), max(1, round(h * scale))


def _encode(item: SourceItem, settings: dict[str, Any]) -> tuple[str, bytes, dict[str, Any]]:
    """Read, check and (optionally) pre-resize one image; returns (ext, bytes, json meta).

    Sizes in the meta are those of the upright image (EXIF orientation applied), as training
    decodes it; re-encoded images are stored upright and 16-bit ones scaled to 8 bits.
    """
    data = Path(item.path).read_bytes()
    img: Image.Image = Image.open(io.BytesIO(data))
    fmt, (w, h) = img.format, oriented_size(img)
    if settings["verify"]:
        img.load()  # full decode: catches truncated files that only have a valid header
    meta: dict[str, Any] = {"path": item.rel, "width": w, "height": h}
    target = _target_size(w, h, settings["max_side"], settings["short_side"])
    if target is None and fmt in FORMAT_EXT:
        return FORMAT_EXT[fmt], data, meta  # original bytes, no re-encode
    img = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    if target is None:  # a format readers may not expect: store it losslessly as PNG
        to_rgb(img).save(buf, format="PNG")
        return "png", buf.getvalue(), {**meta, "reencoded": "png"}
    if fmt == "JPEG":
        stored = target if (w, h) == img.size else target[::-1]  # draft works on the stored axes
        img.draft("RGB", stored)  # DCT downscale to >= target first: much faster, same quality
    img = to_rgb(img).resize(target, Image.Resampling.BICUBIC)
    img.save(buf, format="JPEG", quality=settings["quality"])
    meta.update(width=target[0], height=target[1], orig_width=w, orig_height=h)
    return "jpg", buf.getvalue(), meta


# --------------------------------------------------------------------------- one shard


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _write_shard(job: tuple[int, list[SourceItem], int, str, dict[str, Any], str]) -> dict[str, Any]:
    """Write one shard (temp name, record, rename); returns its record. Runs in a worker process."""
    import webdataset as wds

    index, items, first, out_dir, settings, plan_id = job
    out = Path(out_dir)
    name = _shard_name(settings["prefix"], index)
    for stale in out.glob(f".{name}.tmp-*"):  # left by an interrupted run
        stale.unlink()
    tmp = out / f".{name}.tmp-{os.getpid()}"
    count, skipped = 0, []
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
        for offset, item in enumerate(items):
            try:
                ext, data, meta = _encode(item, settings)
            except UnidentifiedImageError:
                skipped.append({"path": item.rel, "reason": "not an image PIL can identify"})
                continue
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and listed
                skipped.append({"path": item.rel, "reason": f"{type(e).__name__}: {e}"})
                continue
            sample = {"__key__": f"{first + offset:09d}", ext: data, "json": json.dumps(meta, sort_keys=True)}
            if item.label is not None:
                sample["cls"] = str(item.label)
            writer.write(
                {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()}
            )
            count += 1
    record = {
        "index": index,
        "name": name,
        "count": count,
        "bytes": tmp.stat().st_size,
        "sha256": file_sha256(tmp),
        "skipped": skipped,
        "plan_id": plan_id,
    }
    (out / PARTS).mkdir(exist_ok=True)
    (out / PARTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out / name)  # last: a final name means a complete shard
    return record


def _existing_record(out: Path, name: str, plan_id: str) -> dict[str, Any] | None:
    """The record of a completed shard, None when it must be (re)written."""
    rec_path = out / PARTS / f"{name}.json"
    if not (out / name).is_file() or not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    if rec.get("plan_id") != plan_id:
        raise ValueError(
            f"{out / name} was written from a different source listing or settings "
            f"(plan {rec.get('plan_id')} != {plan_id}); use a fresh --out directory"
        )
    return rec
