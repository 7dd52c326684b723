"""The shard plan: list a source (ImageFolder, flat folder or CSV/TSV list) and split it into shards.

The plan (which source file goes to which shard) is a pure function of the sorted source listing
and the settings, so a re-run, or another array task, computes the same plan
(:func:`mimscale.data.shards.make_shards` runs it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SourceItem", "list_source", "plan_shards"]


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
