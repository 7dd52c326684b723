"""Write WebDataset shards (plus a manifest) from an ImageFolder tree, a flat folder or a CSV/TSV list.

Usage (the command line lives in :mod:`mimscale.data.shards_cli`; also ``mimscale prep-shards``)::

    make_shards --src /data/imagenet/train --out /shards/in1k-train --shard-size 1000 --workers 16
    make_shards --src list.tsv --out /shards/x --short-side 256 --quality 90   # pre-resized
    make_shards --src ... --out ... --task-index 3 --num-tasks 16    # one Slurm array task
    make_shards merge --out /shards/in1k-train                      # after all tasks

Design choices:

* The shard plan (which source file goes to which shard) is a pure function of the sorted
  source listing and the settings, so a re-run, or another array task, computes the same plan
  and only writes shards whose final file is missing.
* A shard is written under a temporary name, its record is stored in ``.parts/``, and only
  then is the tar renamed: a truncated shard never carries a final name.
* Tar headers use a fixed mtime/owner, so the same input always gives byte-identical shards.
* A file that is not a decodable image is skipped, counted and listed with the reason; it
  never aborts the job.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mimscale.data.manifest import MANIFEST_FORMAT, file_sha256, write_manifest_files
from mimscale.data.transforms import oriented_size, to_rgb

__all__ = ["SourceItem", "list_source", "make_shards", "merge_task_manifests", "plan_shards"]

# PIL format -> extension under which the original bytes are stored (readers key on it).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
TASK_FORMAT = "mimscale-shards-task/1"
PARTS = ".parts"


@dataclass(frozen=True)
class SourceItem:
    """One source file: absolute path, path relative to the source root, label, size on disk."""

    path: str
    rel: str
    label: int | None
    nbytes: int


# --------------------------------------------------------------------------- source listing


def _files_under(root: Path) -> list[Path]:
    """Regular, non-hidden files below ``root``, sorted (deterministic across runs and hosts)."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def _list_csv(src: Path) -> tuple[list[tuple[Path, str | None]], str]:
    delim = "\t" if src.suffix.lower() == ".tsv" else ","
    rows = []
    with open(src, newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter=delim)):
            if not row or row[0].startswith("#") or (i == 0 and row[0].strip().lower() in ("path", "file")):
                continue
            p = Path(row[0].strip())
            rows.append((p if p.is_absolute() else src.parent / p, row[1].strip() if len(row) > 1 else None))
    return rows, "list"


def list_source(src: str | os.PathLike[str]) -> tuple[list[SourceItem], dict[str, int] | None, str]:
    """List a source: ImageFolder (one sub-folder per class), flat folder, or CSV/TSV ``path[,label]``.

    Non-image files are listed too: they are detected (and skipped) by content when written.

    Args:
        src: a directory or a ``.csv`` / ``.tsv`` file.

    Returns:
        ``(items, classes, kind)``: items sorted by relative path, the class-name -> index map
        (None without labels) and the kind (``imagefolder``, ``folder`` or ``list``).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: the source holds no files, naming where it looked.
    """
    root = Path(src).resolve()
    if not root.exists():
        raise FileNotFoundError(f"{root}: shard source does not exist")
    if root.is_file():
        pairs, kind = _list_csv(root)
        base = root.parent
        where = f"the rows of {root}"
    else:
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        class_dirs = [d for d in subdirs if _files_under(d)]
        if class_dirs:
            kind, where = "imagefolder", f"the class sub-folders of {root} ({len(class_dirs)} found)"
            pairs = [(f, d.name) for d in class_dirs for f in _files_under(d)]
        else:
            kind, where = "folder", f"the files directly in {root}"
            pairs = [(f, None) for f in sorted(root.iterdir()) if f.is_file() and not f.name.startswith(".")]
        base = root
    if not pairs:
        raise ValueError(f"no image files found: looked in {where}")
    names = sorted({lab for _, lab in pairs if lab is not None}, key=_natural_key)
    classes = {n: i for i, n in enumerate(names)} if names else None
    items = []
    for path, lab in pairs:
        rel = os.path.relpath(path, base)
        size = path.stat().st_size if path.is_file() else -1  # a missing listed file is skipped later
        items.append(SourceItem(str(path), rel, classes[lab] if classes and lab is not None else None, size))
    items.sort(key=lambda it: it.rel)
    return items, classes, kind


def _natural_key(name: str) -> tuple[int, int | str]:
    """Numeric labels sort numerically ("2" < "10"); names sort alphabetically."""
    return (0, int(name)) if name.isdigit() else (1, name)


# --------------------------------------------------------------------------- plan


def plan_shards(items: Sequence[SourceItem], shard_size: int | None, shard_bytes: int | None) -> list[range]:
    """Split items (in order) into shards by sample count and/or source bytes.

    A new shard starts when adding the next item would exceed ``shard_size`` samples or
    ``shard_bytes`` source bytes (a single larger item still gets its own shard).

    Returns:
        One ``range`` of item indices per shard.
    """
    if not shard_size and not shard_bytes:
        raise ValueError("give a shard size in samples and/or bytes")
    plan, start, nbytes = [], 0, 0
    for i, it in enumerate(items):
        full_count = shard_size and i - start >= shard_size
        full_bytes = shard_bytes and i > start and nbytes + max(it.nbytes, 0) > shard_bytes
        if full_count or full_bytes:
            plan.append(range(start, i))
            start, nbytes = i, 0
        nbytes += max(it.nbytes, 0)
    plan.append(range(start, len(items)))
    return plan


def _plan_id(items: Sequence[SourceItem], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.rel}\0{it.label}\0{it.nbytes}\n".encode())
    return h.hexdigest()[:16]


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


# --------------------------------------------------------------------------- the job


def _run_jobs(jobs: list[tuple], workers: int, progress: bool, total_images: int) -> list[dict[str, Any]]:
    """Write shards in ``workers`` processes (in-process for 1) with a tqdm bar over images."""
    from tqdm import tqdm

    records = []
    with tqdm(total=total_images, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(jobs) <= 1:
            results = map(_write_shard, jobs)
            for rec in results:
                records.append(rec)
                bar.update(rec["count"] + len(rec["skipped"]))
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for rec in pool.imap_unordered(_write_shard, jobs):
                    records.append(rec)
                    bar.update(rec["count"] + len(rec["skipped"]))
    return records


def _task_range(num_shards: int, task_index: int, num_tasks: int) -> range:
    """Contiguous, balanced, disjoint shard ranges for the tasks of a Slurm array."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} not in [0, {num_tasks})")
    return range(task_index * num_shards // num_tasks, (task_index + 1) * num_shards // num_tasks)


def _manifest(base: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The final manifest from the plan's base fields and every shard's record."""
    records = sorted(records, key=lambda r: r["index"])
    shards = [{k: r[k] for k in ("name", "count", "bytes", "sha256")} for r in records if r["count"] > 0]
    return {
        "format": MANIFEST_FORMAT,
        **{k: base[k] for k in ("prefix", "classes", "source", "settings", "plan_id")},
        "total": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": [s for r in records for s in r["skipped"]],
    }


def _pending(
    items: list[SourceItem], plan: list[range], mine: range, out_dir: Path, settings: dict, plan_id: str
) -> tuple[list[tuple], list[dict[str, Any]]]:
    """Split this task's shards into jobs still to write and records of completed ones."""
    jobs, reused = [], []
    for i in mine:
        rec = _existing_record(out_dir, _shard_name(settings["prefix"], i), plan_id)
        if rec is not None:
            reused.append(rec)
        else:
            jobs.append((i, [items[j] for j in plan[i]], plan[i].start, str(out_dir), settings, plan_id))
    return jobs, reused


def make_shards(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    shard_size: int | None = 1000,
    shard_bytes: int | None = None,
    max_side: int | None = None,
    short_side: int | None = None,
    quality: int = 90,
    verify: bool = True,
    workers: int = 1,
    task_index: int = 0,
    num_tasks: int = 1,
    split: str = "train",
    progress: bool = True,
    shuffle_seed: int | None = 0,
) -> dict[str, Any]:
    """Write shards ``out/PREFIX-000000.tar, ...`` and (for a single task) the manifest files.

    Args:
        src: ImageFolder root, flat folder, or CSV/TSV list (``path[,label]``, relative paths are
            relative to the list file).
        out: output directory (created).
        prefix: shard name prefix; default the output directory's name.
        shard_size: maximum samples per shard.
        shard_bytes: maximum source bytes per shard (counted on the source files, so the plan
            is known before anything is encoded).
        max_side: pre-resize so the longer side is at most this (JPEG re-encode).
        short_side: pre-resize so the shorter side is at most this (JPEG re-encode).
        quality: JPEG quality of pre-resized images.
        verify: fully decode every image (catches truncated files); False checks headers only.
        workers: writer processes.
        task_index: this task's index in a Slurm array (writes a disjoint shard range).
        num_tasks: number of array tasks; > 1 writes a per-task manifest to ``merge`` later.
        split: split name for timm's ``_info.json``.
        progress: show a tqdm bar.
        shuffle_seed: seeded permutation of the listed items before planning, so a shard holds
            many classes (an ImageFolder lists class by class; readers only mix within a shuffle
            buffer). ``None`` keeps the listing order. The plan stays deterministic, so an
            interrupted run resumes into the same shards.

    Returns:
        The summary dict (images, skipped, bytes, seconds, images_per_s, shards written/reused)
        with the manifest (or per-task manifest) path under ``"manifest"``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    items, classes, kind = list_source(src)
    if shuffle_seed is not None:
        items = [items[i] for i in np.random.default_rng(shuffle_seed).permutation(len(items))]
    settings = {
        "shuffle_seed": shuffle_seed,
        "prefix": prefix or out_dir.name,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "max_side": max_side,
        "short_side": short_side,
        "quality": quality if (max_side or short_side) else None,
        "verify": verify,
    }
    plan = plan_shards(items, shard_size, shard_bytes)
    plan_id = _plan_id(items, settings)
    jobs, reused = _pending(
        items, plan, _task_range(len(plan), task_index, num_tasks), out_dir, settings, plan_id
    )
    written = _run_jobs(jobs, workers, progress, sum(len(j[1]) for j in jobs))
    base = {
        "prefix": settings["prefix"],
        "classes": classes,
        "source": {"path": str(Path(src).resolve()), "kind": kind, "files": len(items)},
        "settings": settings,
        "plan_id": plan_id,
    }
    task = (task_index, num_tasks, len(plan))
    mpath = _write_task_manifest(out_dir, base, reused + written, task, split)
    return _summary(written, reused, time.perf_counter() - t0, mpath)


def _write_task_manifest(
    out_dir: Path, base: dict[str, Any], records: list[dict[str, Any]], task: tuple[int, int, int], split: str
) -> Path:
    """The final manifest files (a single task) or this array task's manifest; returns its path.

    Args:
        task: ``(task_index, num_tasks, num_shards_planned)``.
    """
    task_index, num_tasks, planned = task
    if num_tasks == 1:
        write_manifest_files(out_dir, _manifest(base, records), split)
        return out_dir / "manifest.json"
    mpath = out_dir / f"manifest.task-{task_index:05d}-of-{num_tasks:05d}.json"
    part = {
        "format": TASK_FORMAT,
        **base,
        "task_index": task_index,
        "num_tasks": num_tasks,
        "num_shards_planned": planned,
        "split": split,
        "records": records,
    }
    mpath.write_text(json.dumps(part, indent=1) + "\n")
    return mpath


def _summary(written: list[dict], reused: list[dict], seconds: float, mpath: Path) -> dict[str, Any]:
    images = sum(r["count"] for r in written)
    skipped = [s for r in written + reused for s in r["skipped"]]
    summary = {
        "images": images,
        "skipped": len(skipped),
        "bytes": sum(r["bytes"] for r in written),
        "seconds": round(seconds, 3),
        "images_per_s": round(images / max(seconds, 1e-9), 1),
        "shards_written": len(written),
        "shards_reused": len(reused),
        "manifest": str(mpath),
    }
    for s in skipped[:20]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more (all listed in the manifest)", file=sys.stderr)
    return summary


def merge_task_manifests(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Merge the per-task manifests of an array job into ``manifest.json`` (+ sizes/_info).

    Raises:
        ValueError: a task manifest is missing, tasks disagree on the plan, or shards are missing.
    """
    out_dir = Path(out).resolve()
    tasks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("manifest.task-*-of-*.json"))]
    if not tasks:
        raise ValueError(f"{out_dir}: no per-task manifests (manifest.task-*-of-*.json) to merge")
    n = tasks[0]["num_tasks"]
    if {t["plan_id"] for t in tasks} != {tasks[0]["plan_id"]} or {t["num_tasks"] for t in tasks} != {n}:
        raise ValueError(f"{out_dir}: per-task manifests come from different plans; re-run the failed tasks")
    missing = sorted(set(range(n)) - {t["task_index"] for t in tasks})
    if missing:
        raise ValueError(f"{out_dir}: tasks {missing} of {n} have not finished (no manifest); re-run them")
    records = {r["index"]: r for t in tasks for r in t["records"]}
    absent = sorted(set(range(tasks[0]["num_shards_planned"])) - set(records))
    if absent:
        raise ValueError(f"{out_dir}: shards {absent[:10]} are missing from the task manifests")
    manifest = _manifest(tasks[0], list(records.values()))
    write_manifest_files(out_dir, manifest, tasks[0]["split"])
    return {
        "total": manifest["total"],
        "shards": len(manifest["shards"]),
        "skipped": len(manifest["skipped"]),
    }
