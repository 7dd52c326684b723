"""Command line of the shard writer: ``mimscale prep-shards`` / ``python data_prep/make_shards.py``.

    make_shards --src /data/imagenet/train --out /shards/in1k-train --shard-size 1000 --workers 16
    make_shards merge --out /shards/in1k-train      # after all tasks of an array job

The logic lives in :mod:`mimscale.data.shards`; this module only parses flags and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mimscale.data.shards import make_shards, merge_task_manifests

__all__ = ["main"]


def _size(text: str) -> int:
    """``"500M"`` / ``"2G"`` / ``"1000000"`` -> bytes."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    return int(float(t[:-1]) * mult[t[-1]]) if t and t[-1] in mult else int(t)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards",
        description="Write WebDataset shards + manifest (`make_shards merge --out D` "
        "merges the per-task manifests of an array job).",
    )
    p.add_argument(
        "--src", required=True, help="ImageFolder root, flat folder, or .csv/.tsv list (path[,label])"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the --out directory's name)")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (0: bytes only)")
    p.add_argument("--shard-bytes", type=_size, default=None, help="max source bytes per shard, e.g. 1G")
    p.add_argument("--max-side", type=int, default=None, help="pre-resize: longer side at most N")
    p.add_argument("--short-side", type=int, default=None, help="pre-resize: shorter side at most N")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of pre-resized images")
    p.add_argument("--no-verify", action="store_true", help="check image headers only (no full decode)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--task-index", type=int, default=0, help="this array task (disjoint shard range)")
    p.add_argument("--num-tasks", type=int, default=1, help="array size; >1 writes per-task manifests")
    p.add_argument("--split", default="train", help="split name in timm's _info.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the item permutation (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source's listing order")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            mp = argparse.ArgumentParser(prog="make_shards merge")
            mp.add_argument("--out", required=True)
            print(json.dumps(merge_task_manifests(mp.parse_args(argv[1:]).out)))
            return 0
        a = _parser().parse_args(argv)
        summary = make_shards(
            a.src,
            a.out,
            prefix=a.prefix,
            shard_size=a.shard_size or None,
            shard_bytes=a.shard_bytes,
            max_side=a.max_side,
            short_side=a.short_side,
            quality=a.quality,
            verify=not a.no_verify,
            workers=a.workers,
            task_index=a.task_index,
            num_tasks=a.num_tasks,
            split=a.split,
            shuffle_seed=None if a.no_shuffle else a.shuffle_seed,
            progress=not a.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
