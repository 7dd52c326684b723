"""Demo data: scikit-learn's digits (1,797 real 8x8 scans, 10 classes) as train/val shards.

Nothing is downloaded: the images ship inside scikit-learn. They are upscaled to
``size x size`` RGB, written to a temporary ImageFolder tree and sharded by the same tool as
real data (:func:`mimscale.data.shards.make_shards`), so tests and the CPU demo exercise the
production path. A second call with the same settings reuses the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mimscale.data.manifest import read_manifest, write_manifest_files
from mimscale.data.shards import make_shards

__all__ = ["digits_arrays", "main", "write_digits_shards"]


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Stratified split: bool ``[n]``, True for validation (``round(frac * n_c)`` per class)."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_val[idx[: int(round(val_fraction * len(idx)))]] = True
    return is_val


def _upscale(img: np.ndarray, size: int) -> Image.Image:
    """One digit (``[8, 8]`` in 0..16) -> RGB ``size x size`` (bicubic, as every demo image)."""
    gray = Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8))
    return gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def digits_arrays(size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """The demo's digits split as uint8 arrays: the exact pixels and split the shards hold.

    Returns:
        ``{"train_x": [n, 3, size, size] uint8, "train_y": [n] int64, "val_x", "val_y"}``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    is_val = _split(labels, val_fraction, seed)
    x = np.stack([np.asarray(_upscale(img, size)) for img in digits.images]).transpose(0, 3, 1, 2)
    return {"train_x": x[~is_val], "train_y": labels[~is_val], "val_x": x[is_val], "val_y": labels[is_val]}


def _write_tree(root: Path, images: np.ndarray, labels: np.ndarray, size: int, fmt: str) -> None:
    """Digits (``[n, 8, 8]`` in 0..16) -> ``root/<label>/<index>.<ext>`` RGB ``size x size``."""
    ext = {"png": "png", "jpeg": "jpg"}[fmt]
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        rgb = _upscale(img, size)
        d = root / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        rgb.save(d / f"{i:04d}.{ext}", **({"quality": 95} if fmt == "jpeg" else {}))  # type: ignore[arg-type]


def write_digits_shards(
    out_dir: str | os.PathLike[str],
    size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    fmt: str = "png",
    shard_size: int = 256,
    validation: bool = False,
) -> dict[str, Any]:
    """Write (or reuse) ``out_dir/train`` and ``out_dir/val`` digits shards with manifests.

    Args:
        out_dir: destination; holds ``train/``, ``val/`` and ``demo.json`` (the settings).
        size: image side in pixels after upscaling.
        val_fraction: stratified fraction held out for validation.
        seed: split seed.
        fmt: ``png`` (lossless) or ``jpeg``.
        shard_size: samples per shard (256 gives 6 train and 2 val shards).
        validation: carve ``val`` out of the train split instead (the same stratified fraction,
            split seed ``seed + 1``) and leave the held-out images out entirely: for choosing
            settings without looking at the split the demo reports.

    Returns:
        ``{"train": manifest path, "val": manifest path, "num_train", "num_val",
        "num_classes", "size", "reused"}``.
    """
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    settings = {
        "size": size,
        "val_fraction": val_fraction,
        "seed": seed,
        "fmt": fmt,
        "shuffled": True,  # shards mix classes (older caches were written in class order)
        "shard_size": shard_size,
        **({"validation": True} if validation else {}),  # older caches have no such key
    }
    info = _cached(out, settings)
    if info is not None:
        return {**info, "reused": True}
    if (out / "demo.json").is_file():  # our own earlier output with other settings: replace it
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    is_val = _split(labels, val_fraction, seed)
    train, val = ~is_val, is_val
    if validation:  # the held-out images are dropped; a second split of the train images is val
        idx = np.flatnonzero(~is_val)
        carved = _split(labels[idx], val_fraction, seed + 1)
        train, val = (
            np.isin(np.arange(len(labels)), idx[~carved]),
            np.isin(np.arange(len(labels)), idx[carved]),
        )
    result: dict[str, Any] = {}
    for split, sel in (("train", train), ("val", val)):
        with tempfile.TemporaryDirectory(prefix=f"digits-{split}-") as tmp:
            _write_tree(Path(tmp), digits.images[sel], labels[sel], size, fmt)
            make_shards(
                tmp, out / split, prefix=f"digits-{split}", shard_size=shard_size, split=split, progress=False
            )
        manifest = read_manifest(out / split)  # name the real source, not the temporary tree
        manifest["source"] = {"path": "sklearn.datasets.load_digits", "kind": "imagefolder", "split": split}
        write_manifest_files(out / split, manifest, split)
        result[split] = str(out / split / "manifest.json")
        result[f"num_{split}"] = int(sel.sum())
    result.update(num_classes=10, size=size)
    (out / "demo.json").write_text(json.dumps({"settings": settings, **result}, indent=1) + "\n")
    return {**result, "reused": False}


def _cached(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The previous result when ``demo.json`` and both manifests match ``settings``."""
    meta = out / "demo.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
        if info.pop("settings") != settings:
            return None
        for split in ("train", "val"):
            m = read_manifest(info[split])
            if m["total"] != info[f"num_{split}"] or not all(
                (out / split / s["name"]).is_file() for s in m["shards"]
            ):
                return None
    except (ValueError, KeyError, FileNotFoundError):
        return None
    return info


def main(argv: list[str] | None = None) -> int:
    """``mimscale demo-data OUT [--size 32] [--fmt png|jpeg] [--validation]``; prints the result as JSON."""
    p = argparse.ArgumentParser(prog="mimscale demo-data", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmt", choices=["png", "jpeg"], default="png")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--validation", action="store_true", help="val carved out of the train split (for tuning)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    res = write_digits_shards(a.out, a.size, a.val_fraction, a.seed, a.fmt, a.shard_size, a.validation)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
