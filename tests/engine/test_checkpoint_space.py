"""Disk full during a checkpoint: one line naming the directory, LATEST stays on the last
complete checkpoint (a small tmpfs; skipped where the test cannot mount one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from launch import REPO, python

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 12 MiB tmpfs: one tiny ZeRO-2 checkpoint (8.7 MB) fits, a second does not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_keeps_latest_and_says_so(digits, small_disk: Path) -> None:
    from mimscale.eval.ckpt import method_state_dict

    args = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(small_disk),
        "run.name": "full",
        "train.zero_stage": 2,
        "train.max_steps": 2,
        "train.ckpt_every": 1,
        "train.global_batch": 64,
        "train.micro_batch": 64,
        "data.num_workers": 1,
    }
    res = subprocess.run(
        [python(), "-m", "mimscale.train", RECIPE, *(f"{k}={v}" for k, v in args.items())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )
    ckpt = small_disk / "full" / "checkpoints"
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "unexpected pos" not in res.stderr
    assert f"no space left on device: checkpoint step00000002 could not be written to {ckpt}" in res.stderr
    assert "LATEST still names step00000001" in res.stderr
    assert (ckpt / "LATEST").read_text().strip() == "step00000001"
    assert not (ckpt / "step00000002").exists()  # the partial tag is gone: its space is free again
    assert method_state_dict(small_disk / "full")  # the last complete checkpoint still loads
