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

Where the parts live: :mod:`mimscale.data.shard_plan` lists the source and plans the shards,
:mod:`mimscale.data.shard_writer` encodes and writes one shard, this module runs the job and
writes the manifests, :mod:`mimscale.data.shards_cli` is the command line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mimscale.data.manifest import MANIFEST_FORMAT, write_manifest_files
from mimscale.data.shard_plan import SourceItem, _plan_id, list_source, plan_shards
from mimscale.data.shard_writer import _existing_record, _shard_name, _write_shard

__all__ = ["SourceItem", "list_source", "make_shards", "merge_task_manifests", "plan_shards"]

TASK_FORMAT = "mimscale-shards-task/1"


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
