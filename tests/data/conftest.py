"""Data-test fixtures (the ``digits`` shards fixture lives in ``tests/conftest.py``)."""

from __future__ import annotations

import io

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def photo_jpeg() -> bytes:
    """One real 512x512 photo as JPEG bytes (large enough for draft decoding at size 64)."""
    import skimage.data as skd

    buf = io.BytesIO()
    Image.fromarray(skd.astronaut()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
