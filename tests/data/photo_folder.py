"""A small ImageFolder of real photographs for shard-writing tests (imported by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    """Real photographs that scikit-image / scikit-learn ship (no download)."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    return [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), *load_sample_images().images]


def make_photo_folder(root: Path, per_class: int = 5, bad: bool = True) -> dict[str, str]:
    """ImageFolder of small real photos: 3 classes, JPEG and PNG, varied sizes.

    With ``bad``, adds a truncated JPEG and a text file (both must be skipped and listed).

    Returns:
        relative path -> class name of every good image.
    """
    photos = _photos()
    good = {}
    for c, cls in enumerate(["cat", "cup", "rocket"]):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = photos[(c * per_class + i) % len(photos)]
            w, h = 40 + 8 * i, 30 + 6 * ((i + c) % 4)
            img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
            name = f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
            img.save(d / name)
            good[f"{cls}/{name}"] = cls
    if bad:
        jpg = (root / "cat" / "img0.jpg").read_bytes()
        (root / "cup" / "broken.jpg").write_bytes(jpg[: len(jpg) // 2])
        (root / "rocket" / "notes.txt").write_text("not an image\n")
    return good
