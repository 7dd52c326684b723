"""Data-loader benchmark: images/s of ONE worker process (read shard + decode + RRC to 224).

Real photographs (the two that scikit-learn ships, as eight frames) are upscaled to ImageNet-like sizes
(long side 500..1000 px), JPEG-encoded, and sharded twice: original bytes ("full") and
pre-resized to a short side of 256 ("short256", ``make_shards --short-side 256``). Each set is
read through the real pipeline (``num_workers=0``, so the figure is per process) with and
without JPEG draft decoding. Multiply by ``data.num_workers`` for a rank's ceiling.

    mimscale bench data [--images 32] [--epochs 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mimscale.bench.common import emit

__all__ = ["main", "run"]


def _photos() -> list[np.ndarray]:
    """Eight real-photo frames: each of scikit-learn's two photos whole, its left and right 3/4 crops,
    and transposed (portrait), so the sources differ in content and aspect (no extra dependency)."""
    from sklearn.datasets import load_sample_images

    frames = []
    for img in load_sample_images().images:  # 427 x 640 RGB uint8
        w = img.shape[1]
        frames += [img, img[:, : 3 * w // 4], img[:, w // 4 :], img.transpose(1, 0, 2)]
    return [np.ascontiguousarray(f) for f in frames]


def _write_sources(root: Path, n: int, seed: int) -> dict[str, float]:
    """``n`` JPEGs (q 90) at ImageNet-like sizes in ``root``; returns size statistics."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    sides, nbytes = [], []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        long_side = int(rng.integers(500, 1001))
        aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4]))
        w, h = (
            (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        )
        img = Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        sides.append((w, h))
        nbytes.append(len(buf.getvalue()))
    return {
        "mean_width": float(np.mean([s[0] for s in sides])),
        "mean_height": float(np.mean([s[1] for s in sides])),
        "mean_kb": float(np.mean(nbytes) / 1024),
    }


def _images_per_s(manifest: str, draft: bool, epochs: int, batch: int) -> float:
    """Throughput of the real pipeline in this process (decode + RRC 224 + hflip + collate)."""
    from mimscale.config import DataConfig, MaskConfig, ViewConfig
    from mimscale.data.pipeline import build_train_loader

    data = DataConfig(
        train=manifest,
        epoch_mode="exact",
        num_workers=0,
        shuffle_buffer=0,
        draft=draft,
        views=[ViewConfig(size=224, crop="rrc", scale=[0.2, 1.0])],
    )
    loader = build_train_loader(
        data,
        MaskConfig(kind="none"),
        img_size=224,
        patch_size=16,
        batch_size=batch,
        seed=0,
        rank=0,
        world_size=1,
    )
    next(iter(loader))  # warm-up: imports, first file opens
    loader.set_epoch(1)
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        n += sum(int(b["valid"].sum()) for b in loader)
    return n / (time.perf_counter() - t0)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints (and with ``--out`` writes) and returns the JSON result.

    Args:
        argv: ``[--images N] [--epochs E] [--batch B] [--seed S] [--out FILE]``.

    Returns:
        ``{"images_per_s_per_worker": {"full": {"draft": x, "no_draft": y}, "short256": {...}},
        "draft_speedup_full": ..., "source": {...}, ...}``.
    """
    from mimscale.data.shards import make_shards

    p = argparse.ArgumentParser(prog="mimscale bench data", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32, help="distinct source photos (JPEG)")
    p.add_argument("--epochs", type=int, default=2, help="passes over them per measurement")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="mimscale-bench-") as tmp:
        root = Path(tmp)
        stats = _write_sources(root / "src", a.images, a.seed)
        sets: dict[str, dict[str, Any]] = {"full": {}, "short256": {"short_side": 256, "quality": 90}}
        result: dict[str, Any] = {}
        for name, kw in sets.items():
            make_shards(root / "src", root / name, shard_size=a.images, progress=False, **kw)
            manifest = str(root / name / "manifest.json")
            result[name] = {
                "draft": round(_images_per_s(manifest, True, a.epochs, a.batch), 1),
                "no_draft": round(_images_per_s(manifest, False, a.epochs, a.batch), 1),
            }
    out = {
        "benchmark": "data",
        "what": "images/s per worker process: shard read + JPEG decode + RandomResizedCrop 224 + collate",
        "images_per_s_per_worker": result,
        "draft_speedup_full": round(result["full"]["draft"] / result["full"]["no_draft"], 2),
        "preresize_speedup": round(result["short256"]["no_draft"] / result["full"]["no_draft"], 2),
        "source": {"images": a.images, "epochs": a.epochs, **{k: round(v, 1) for k, v in stats.items()}},
    }
    emit(out, a.out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``mimscale bench data ...``: print the JSON report."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
