"""Hostile samples: whatever breaks one sample (its label, its header, its bytes) is that sample's
failure, skipped and counted with ``data.on_error: skip`` or one line naming shard and sample with
``fail``; an image above ``data.max_pixels`` is refused from its header, before decoding."""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimscale.config import DataConfig
from mimscale.data.pipeline import ShardReadError, build_eval_loader
from mimscale.data.transforms import check_pixels

SHARD = "digits-val-000000.tar"
BAD_AT = 3  # position of the hostile sample in SHARD


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says ``width x height`` (valid CRC) over a tiny 1x1 body: what a decoder
    would need for it is ``width * height`` pixels; only the header can be read cheaply."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # keep depth, colour type, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# (what is replaced, its new bytes, a fragment of the reason); each breaks only its own sample.
CASES = {
    "label overflowing int64": ("cls", b"99999999999999999999999", "is not a class index"),
    "negative label": ("cls", b"-7", "is not a class index"),
    "label not a number": ("cls", b"dog", "is not a class index"),
    "label of 5000 digits": ("cls", b"9" * 5000, "is not a class index"),
    "header claiming 12000x12000": ("png", png_claiming(12000, 12000), "12000x12000 = 144.0 MPix"),
    "image above a lowered cap": ("png", _big_png(300), "300x300 = 0.1 MPix"),
    "garbage image bytes": ("png", b"\x89PNG garbage", "cannot identify image"),
    "no image entry": ("png", None, "no image entry"),
}


def _hostile_val(digits: dict, tmp_path: Path, field: str, payload: bytes | None) -> str:
    """A copy of the digits val shards with sample BAD_AT of SHARD given ``field = payload``
    (``None`` drops the field); the manifest is kept true to the files."""
    shutil.copytree(Path(digits["val"]).parent, tmp_path / "val")
    shard = tmp_path / "val" / SHARD
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    if payload is None:
        samples[BAD_AT]["txt"] = samples[BAD_AT].pop(field)
    else:
        samples[BAD_AT][field] = payload
    with wds.TarWriter(str(shard), mtime=0) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    _refresh_manifest(tmp_path / "val")
    return samples[BAD_AT]["__key__"]


def _refresh_manifest(folder: Path) -> None:
    import hashlib
    import json

    m = json.loads((folder / "manifest.json").read_text())
    for entry in m["shards"]:
        data = (folder / entry["name"]).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def _read(tmp_path: Path, on_error: str, max_pixels: int, workers: int = 0) -> list[dict]:
    data = DataConfig(
        val=str(tmp_path / "val"), num_workers=workers, on_error=on_error, max_pixels=max_pixels
    )
    return list(build_eval_loader(data, img_size=32, batch_size=64, rank=0, world_size=1))


def _cap(case: str) -> int:
    return 50_000 if case == "image above a lowered cap" else DataConfig().max_pixels


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_sample_is_skipped_and_counted(digits: dict, tmp_path: Path, case: str) -> None:
    field, payload, reason = CASES[case]
    key = _hostile_val(digits, tmp_path, field, payload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = _read(tmp_path, "skip", _cap(case))
    said = [str(w.message) for w in caught if key in str(w.message)]
    assert len(said) == 1 and SHARD in said[0] and reason in said[0] and len(said[0]) < 500
    keys = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]
    assert len(keys) == 358 and key not in keys  # every other sample is read, this one is not
    assert batches[-1]["n_skipped"] == 1
    labels = np.concatenate([b["labels"][b["valid"]].numpy() for b in batches])
    assert labels.min() >= 0 and labels.max() <= 9  # the digits' classes, nothing from the bad row


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_sample_with_on_error_fail_names_shard_and_sample(
    digits: dict, tmp_path: Path, case: str
) -> None:
    field, payload, reason = CASES[case]
    key = _hostile_val(digits, tmp_path, field, payload)
    with pytest.raises(ShardReadError) as info:  # from a loader worker: re-raised with its traceback
        _read(tmp_path, "fail", _cap(case), workers=1)
    assert "Traceback" in str(info.value)
    line = info.value.line()
    assert SHARD in line and repr(key) in line and reason in line
    assert "\n" not in line and len(line) < 500


@pytest.mark.parametrize(
    ("size", "cap", "refused"),
    [((12000, 12000), 64_000_000, True), ((8000, 8000), 64_000_000, False), ((100, 101), 10_000, True)],
)
def test_the_pixel_cap_reads_the_header_only(size: tuple[int, int], cap: int, refused: bool) -> None:
    data = png_claiming(*size)  # its body holds one pixel: decoding it would fail differently
    if refused:
        with pytest.raises(ValueError, match=f"{size[0]}x{size[1]} .* above data.max_pixels"):
            check_pixels(data, cap)
    else:
        check_pixels(data, cap)


@pytest.mark.slow
def test_train_with_on_error_fail_stops_with_one_line_and_exit_2(digits: dict, tmp_path: Path) -> None:
    """The CLI end to end: a worker's ShardReadError is one line on stderr, exit 2, no traceback."""
    import subprocess

    from launch import REPO

    shutil.copytree(Path(digits["train"]).parent, tmp_path / "train")
    for shard in sorted((tmp_path / "train").glob("*.tar")):  # every sample: the first batch meets one
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        with wds.TarWriter(str(shard), mtime=0) as w:
            for s in samples:
                s["cls"] = b"99999999999999999999999"
                w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    _refresh_manifest(tmp_path / "train")
    args = [
        f"data.train={tmp_path / 'train'}", f"data.val={digits['val']}", "data.on_error=fail",
        "data.num_workers=2", f"run.out_dir={tmp_path}", "train.max_steps=4",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "mimscale.cli", "train", "recipes/mae/cpu_tiny.yaml", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    said = [x for x in out.stderr.splitlines() if x.startswith("data error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(said) == 1 and ".tar: sample '" in said[0] and "is not a class index" in said[0]
    assert "Traceback" not in out.stderr
