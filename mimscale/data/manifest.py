"""Shard manifests and input resolution (manifest, brace pattern, local path or ``pipe:`` url).

A manifest (``manifest.json`` beside the shards) is what lets training and evaluation know the
epoch length and per-shard sample counts without scanning any tar file. Two other tools'
formats are written beside it: open_clip's ``sizes.json`` and timm's ``_info.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_FORMAT",
    "ShardSource",
    "file_sha256",
    "read_manifest",
    "resolve_source",
    "shard_file_problems",
    "write_manifest_files",
]

MANIFEST_FORMAT = "mimscale-shards/1"
_HOW_TO_WRITE = "write shards with `mimscale prep-shards --src IMAGES --out DIR`, or `mimscale demo-data DIR`"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks (the digest manifests record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardSource:
    """Resolved input: shard urls and, when known, their sample counts.

    Attributes:
        urls: one url per shard (local path, ``pipe:`` command, anything WebDataset opens).
        counts: samples per shard (same order), or None when no manifest was found.
        classes: class name -> index, when the manifest has labels.
        manifest: path of the manifest used, if any.
        nbytes: size of each shard file in bytes, when the manifest records it.
        sha256: hex digest of each shard file, when the manifest records it.
    """

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None = None
    classes: dict[str, int] | None = None
    manifest: str | None = None
    nbytes: tuple[int, ...] | None = None
    sha256: tuple[str, ...] | None = None

    @property
    def total(self) -> int | None:
        """Total samples, or None when counts are unknown."""
        return sum(self.counts) if self.counts is not None else None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a shard manifest.

    Args:
        path: ``manifest.json`` or the directory that holds it.

    Returns:
        The manifest dict (keys: format, prefix, shards [{name, count, bytes, sha256}], total,
        classes, source, settings, skipped).

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ValueError: the file is not a mimscale manifest, a shard entry is malformed (a name that
            is not a plain file name, a count that is not a positive integer) or the total
            disagrees with the counts; one line naming the file and the entry.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no shard manifest here ({_HOW_TO_WRITE})")
    try:
        with open(p) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{p}: unreadable shard manifest ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{p}: not a mimscale shard manifest (expected format {MANIFEST_FORMAT!r})")
    problems = _entry_problems(m.get("shards"))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{p}: " + "; ".join(problems[:3]) + more + f"; {_HOW_TO_WRITE}")
    total = sum(s["count"] for s in m["shards"])
    if total != m.get("total"):
        raise ValueError(f"{p}: shard counts sum to {total} but total says {m.get('total')!r}")
    return m


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_problems(shards: Any) -> list[str]:
    """What is wrong with a manifest's ``shards`` list, one phrase per bad entry."""
    if not isinstance(shards, list) or not shards:
        return ["'shards' must be a non-empty list of {name, count} entries"]
    out = []
    for i, s in enumerate(shards):
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            out.append(f"shards[{i}]: the name must be a shard file name beside the manifest")
            continue
        count = s.get("count")  # prep-shards never writes an empty shard; 0 would only mislead
        if not _is_count(count) or count < 1:
            out.append(f"shards[{i}] ({name}): count {repr(count)[:20]} is not a positive integer")
        elif "bytes" in s and (not _is_count(s["bytes"]) or s["bytes"] < 0):
            out.append(f"shards[{i}] ({name}): bytes {repr(s['bytes'])[:20]} is not a byte count")
    return out


def shard_file_problems(manifest: str | os.PathLike[str]) -> list[str]:
    """One line per shard of a (valid) manifest whose file is missing or has another size than
    recorded: what a run would otherwise find only when it reaches the shard. Costs a ``stat``
    per shard; digests are checked while the shards stream (:mod:`mimscale.data.reader`).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_manifest`.
    """
    p = Path(manifest)
    m = read_manifest(p)
    base = p if p.is_dir() else p.parent
    out = []
    for s in m["shards"]:
        f = base / s["name"]
        if not f.is_file():
            out.append(f"{f}: listed in {base / 'manifest.json'} but missing")
        elif "bytes" in s and f.stat().st_size != s["bytes"]:
            out.append(f"{f}: {f.stat().st_size} bytes, the manifest says {s['bytes']} (another file?)")
    return out


def _integrity(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-shard sizes and sha256 digests, when the manifest records them for every shard."""
    out: dict[str, Any] = {}
    if shards and all("bytes" in s for s in shards):
        out["nbytes"] = tuple(int(s["bytes"]) for s in shards)
    if shards and all(s.get("sha256") for s in shards):
        out["sha256"] = tuple(str(s["sha256"]) for s in shards)
    return out


def _source_from_manifest(path: Path) -> ShardSource:
    m = read_manifest(path)
    base = path.parent if path.suffix == ".json" else path
    return ShardSource(
        urls=tuple(str(base / s["name"]) for s in m["shards"]),
        counts=tuple(s["count"] for s in m["shards"]),
        classes=m.get("classes"),
        manifest=str(base / "manifest.json") if path.is_dir() else str(path),
        **_integrity(m["shards"]),
    )


def resolve_source(spec: str) -> ShardSource:
    """Turn ``data.train`` / ``data.val`` into shard urls (and counts when a manifest exists).

    Args:
        spec: a manifest path (``.../manifest.json``), a directory holding ``manifest.json``, or
            a WebDataset url pattern: brace-expanded (``in1k-{000000..001281}.tar``), ``::``
            separated, local paths or ``pipe:`` commands. For a local pattern whose shards all
            appear in a ``manifest.json`` beside them, the counts come from that manifest.

    Returns:
        The resolved :class:`ShardSource`.

    Raises:
        ValueError: an empty spec or a pattern that expands to nothing.
        FileNotFoundError: a local path with nothing there (no manifest, directory or shard).
    """
    if not spec:
        raise ValueError(
            "data source is empty: set data.train / data.val to a manifest.json or a shard pattern"
        )
    p = Path(spec)
    if spec.endswith(".json") or p.is_dir():
        return _source_from_manifest(p)
    from webdataset.shardlists import expand_urls  # braceexpand + "::" lists, as WebDataset does

    urls = tuple(expand_urls(spec))
    if not urls:
        raise ValueError(f"{spec}: the shard pattern expands to no urls")
    if _is_local(urls[0]) and not any(Path(u).exists() for u in urls):  # a wrong path, not a bad shard
        raise FileNotFoundError(f"{spec}: no manifest, shard directory or shard file here ({_HOW_TO_WRITE})")
    return _attach_sibling_manifest(urls)


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def _attach_sibling_manifest(urls: tuple[str, ...]) -> ShardSource:
    """Counts for a local pattern from a manifest beside the shards, when it lists them all."""
    if not _is_local(urls[0]):
        return ShardSource(urls=urls)
    mpath = Path(urls[0]).parent / "manifest.json"
    if not mpath.is_file():
        return ShardSource(urls=urls)
    try:
        m = read_manifest(mpath)
    except ValueError:
        return ShardSource(urls=urls)
    by_name = {s["name"]: s for s in m["shards"]}
    names = [Path(u).name for u in urls]
    if not all(n in by_name and Path(u).parent == mpath.parent for n, u in zip(names, urls, strict=True)):
        return ShardSource(urls=urls)
    shards = [by_name[n] for n in names]
    return ShardSource(
        urls=urls,
        counts=tuple(int(s["count"]) for s in shards),
        classes=m.get("classes"),
        manifest=str(mpath),
        **_integrity(shards),
    )


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def write_manifest_files(out_dir: Path, manifest: dict[str, Any], split: str = "train") -> None:
    """Write ``manifest.json``, open_clip's ``sizes.json`` and timm's ``_info.json`` atomically.

    Args:
        out_dir: the shard directory.
        manifest: the mimscale manifest dict (see :func:`read_manifest`).
        split: the split name timm's reader looks up in ``_info.json``.
    """
    shards = manifest["shards"]
    _atomic_json(out_dir / "sizes.json", {s["name"]: s["count"] for s in shards})
    info = {
        "name": manifest["prefix"],
        "splits": {
            split: {
                "name": split,
                "filenames": [s["name"] for s in shards],
                "shard_lengths": [s["count"] for s in shards],
                "num_samples": manifest["total"],
            }
        },
    }
    _atomic_json(out_dir / "_info.json", info)
    _atomic_json(out_dir / "manifest.json", manifest)  # last: its presence means "complete"
