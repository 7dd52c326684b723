"""Device decode (:mod:`mimscale.data.gpu_decode`): its rate, and the real loader's data wait.

    python -m mimscale.bench.decode [--images 32] [--batch 256] [--repeats 5] [--workers 8]
                                    [--batches 64] [--step-img-s 3600] [--short-side 0,256]
                                    [--out FILE]

Real photos (scikit-learn's two, at ImageNet-like sizes, JPEG q 90) are decoded in batches of
``--batch`` on the GPU (nvjpeg; the CPU when there is none) and cropped to one 224 view:
``images_per_s`` is ``decode_views`` alone. ``loader`` then runs the real training loader on
shards of those photos with ``--workers`` workers, ``data.decode: gpu`` and ``cpu``, each batch
followed by a simulated training step of ``batch / --step-img-s`` seconds (the step rate the
loader must keep up with: ``mimscale bench suite`` passes the engine's own measured img/s; the
default 3,600 img/s is ViT-L/16 MAE at 45% MFU on an H100), on shards of the original JPEGs
(``loader``) and, per ``--short-side`` S > 0, on shards pre-resized to short side S
(``loader_shortS``, ``make_shards --short-side S``):

* ``data_wait``: share of the wall time spent waiting for the loader's next batch;
* ``decode_share`` / ``decode_images_per_s``: share and rate of ``prepare_batch`` (the device
  decode with ``gpu``; the copy and normalisation alone with ``cpu``), which the step waits for;
* ``overhead`` = both: what the step rate loses to the input pipeline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mimscale.bench.common import emit, sync


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Median images/s of ``decode_views`` over ``--repeats`` passes, then the loader's data wait."""
    from mimscale.bench.data import _write_sources
    from mimscale.config import ViewConfig
    from mimscale.data.gpu_decode import decode_views, sample_records

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes: tuple[Literal["gpu", "cpu"], ...] = ("gpu", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        _write_sources(src, a.images, seed=0)
        datas = [p.read_bytes() for p in sorted(src.glob("*.jpg"))]
        loaders = {
            "loader" if side == 0 else f"loader_short{side}": {
                mode: loader_wait(src, mode, a, dev, side) for mode in modes
            }
            for side in a.short_side
        }
    datas = (datas * (a.batch // len(datas) + 1))[: a.batch]
    views = [ViewConfig()]
    records = np.stack([sample_records(d, views, np.random.default_rng(i)) for i, d in enumerate(datas)])
    rates = []
    for _ in range(a.repeats + 1):
        sync(dev)
        t0 = time.perf_counter()
        decode_views(datas, records, views, dev)
        sync(dev)
        rates.append(len(datas) / (time.perf_counter() - t0))
    return {"benchmark": "decode", "device": str(dev), "batch": len(datas),
            "images_per_s": statistics.median(rates[1:]), **loaders}  # fmt: skip


def loader_wait(
    src: Path, decode: Literal["gpu", "cpu"], a: argparse.Namespace, dev: torch.device, short_side: int = 0
) -> dict[str, Any]:
    """Data wait of the real loader (``data.decode: decode``) at ``--step-img-s`` on shards of the
    original JPEGs (``short_side`` 0) or pre-resized to that short side; see the module doc."""
    from mimscale.config import DataConfig, MaskConfig, ViewConfig
    from mimscale.data.pipeline import build_train_loader
    from mimscale.data.shards import make_shards
    from mimscale.engine.setup import prepare_batch

    shards = src.parent / f"shards-{decode}-{short_side}"  # beside the sources, in the caller's temp folder
    size = max(1, a.images // max(1, a.workers))
    make_shards(src, shards, shard_size=size, short_side=short_side or None, progress=False)
    data = DataConfig(
        train=str(shards / "manifest.json"), num_workers=a.workers, decode=decode,
        samples_per_epoch=(a.batches + 1) * a.batch, shuffle_buffer=0, views=[ViewConfig()],
    )  # fmt: skip
    loader = build_train_loader(
        data, MaskConfig(), img_size=224, patch_size=16, batch_size=a.batch, seed=0, rank=0, world_size=1
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    step_s = a.batch / a.step_img_s if a.step_img_s > 0 else 0.0
    it = iter(loader)
    prepare_batch(next(it), dev, dtype)  # warm-up: workers start, decoder initialises
    sync(dev)
    wait = dec = 0.0
    t_start = time.perf_counter()
    for _ in range(a.batches):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        prepare_batch(batch, dev, dtype)
        sync(dev)
        t2 = time.perf_counter()
        time.sleep(step_s)  # the training step; the device decode runs before it, not beside it
        wait, dec = wait + t1 - t0, dec + t2 - t1
    total = time.perf_counter() - t_start
    loader.close()
    n = a.batches * a.batch
    return {"workers": a.workers, "batches": a.batches, "step_img_s": a.step_img_s, "short_side": short_side,
            "data_wait": wait / total, "decode_share": dec / total, "overhead": (wait + dec) / total,
            "decode_images_per_s": n / dec if dec > 0 else None,
            "images_per_s": n / total}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="mimscale.bench.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--images", type=int, default=32, help="distinct source photos")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--batches", type=int, default=64, help="timed loader batches (after one warm-up)")
    p.add_argument("--step-img-s", type=float, default=3600.0, help="simulated step rate; 0: no step")
    p.add_argument("--short-side", default="0", help="shards pre-resized to these short sides; 0: originals")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.short_side = [int(x) for x in a.short_side.split(",")]
    return emit(run(a), a.out)


if __name__ == "__main__":
    sys.exit(main())
