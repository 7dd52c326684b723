"""A view's full replay record (crop + every photometric parameter) reproduces its pixels with no
random generator, and drawing it consumes the random stream exactly as augmenting does."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mimscale.config.schema import ViewConfig
from mimscale.data.transforms import (
    REPLAY_FIELDS,
    augment_sample,
    draw_replay,
    oriented_size,
    render_views,
)

VIEWS = [
    ViewConfig(size=64, color_jitter=0.4, color_jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3),
    ViewConfig(size=32, crop="simple", color_jitter=0.4, color_jitter_p=1.0),
]


def test_replay_record_reproduces_every_view_without_a_generator(photo_jpeg) -> None:
    w, h = oriented_size(Image.open(io.BytesIO(photo_jpeg)))
    used = np.zeros(REPLAY_FIELDS - 7, bool)
    for seed in range(24):
        images, crops = augment_sample(photo_jpeg, VIEWS, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        replay = draw_replay(h, w, VIEWS, rng)
        assert replay.shape == (2, REPLAY_FIELDS) and np.array_equal(replay[:, :7], crops)
        # the record alone gives the pixels (a fresh process, another day: no generator state)
        for got, want in zip(render_views(photo_jpeg, VIEWS, replay.copy()), images, strict=True):
            assert np.array_equal(got, want)
        used |= (replay[:, 7:] != 0).any(0)
    assert used[[0, 9, 10, 12]].all()  # jitter, grayscale, blur and solarise all exercised
    # a changed photometric parameter changes the pixels: the record is what decides them
    replay = draw_replay(h, w, VIEWS, np.random.default_rng(0))
    replay[0, 7:] = 0.0
    replay[0, 7 + 12] = 1.0  # solarise only
    plain = replay.copy()
    plain[0, 7:] = 0.0
    a, b = render_views(photo_jpeg, VIEWS, replay)[0], render_views(photo_jpeg, VIEWS, plain)[0]
    assert not np.array_equal(a, b) and np.array_equal(a, np.where(b >= 128, 255 - b, b))
