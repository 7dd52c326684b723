"""Decode + crop rate of the device path (:mod:`mimscale.data.gpu_decode`) in images/s.

    python -m mimscale.bench.decode [--images 256] [--batch 256] [--repeats 5] [--out FILE]

Real photos (scikit-learn's two, at ImageNet-like sizes, JPEG q 90) are decoded in batches of
``--batch`` on the GPU (nvjpeg; the CPU when there is none) and cropped to two 224 views.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from mimscale.bench.common import emit, sync


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Median images/s of ``decode_views`` over ``--repeats`` passes."""
    import tempfile
    from pathlib import Path

    from mimscale.bench.data import _write_sources
    from mimscale.config import ViewConfig
    from mimscale.data.gpu_decode import decode_views, sample_records

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        _write_sources(Path(tmp), a.images, seed=0)
        datas = [p.read_bytes() for p in sorted(Path(tmp).glob("*.jpg"))]
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
            "images_per_s": statistics.median(rates[1:])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="mimscale.bench.decode", description=__doc__)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a), a.out)


if __name__ == "__main__":
    sys.exit(main())
