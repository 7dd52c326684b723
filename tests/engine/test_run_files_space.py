"""Disk full before the first checkpoint: every file a run writes (its lock, recipe.yaml, meta.json,
metrics.jsonl) fails with one line naming the file, as checkpoints already do (was: an OSError
traceback at RUN_DIR/recipe.yaml). A small tmpfs; skipped where the test cannot mount one."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from launch import REPO, python

from mimscale.engine.rundir import disk_full_line


def fill(mnt: Path) -> None:
    """Write until the file system refuses a byte more."""
    with open(mnt / "filler", "ab", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    with open(mnt / "filler", "ab", buffering=0) as f:  # the last partial page too
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _logger(run: Path):
    from mimscale.engine.logger import MetricLogger
    from mimscale.registry import load_recipe

    r = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", ["wandb.enabled=false"])
    return MetricLogger(r, run, rank=0, extra_meta={"derived": {"x": 1}})


@pytest.mark.parametrize("name", [".owner.lock", "meta.json", "metrics.jsonl"])
def test_each_run_file_names_itself_when_the_disk_is_full(small_disk: Path, name: str) -> None:
    from mimscale.engine.rundir import claim

    run = small_disk / "run"
    run.mkdir()  # a directory needs no data page; the files in it do
    write: Callable[[], object]
    if name == ".owner.lock":
        write = lambda: claim(run)  # noqa: E731
    elif name == "meta.json":
        write = lambda: _logger(run)  # noqa: E731
    else:  # meta.json was written at start; the disk filled between two log lines
        log = _logger(run)
        write = lambda: log.log({"step": 1, "loss": 0.5})  # noqa: E731
    fill(small_disk)
    with pytest.raises(OSError) as e:
        write()
    assert disk_full_line(e.value, run) == f"no space left on device: could not write {run / name}"


@pytest.mark.slow
@pytest.mark.parametrize("first", [".owner.lock", "recipe.yaml"])
def test_train_on_a_full_disk_says_which_file_in_one_line(digits, small_disk: Path, first: str) -> None:
    run = small_disk / "full"
    if first == "recipe.yaml":  # a lock file left by an earlier run: rewriting it frees its page
        run.mkdir()
        (run / ".owner.lock").write_bytes(b"x" * 8192)
    fill(small_disk)
    args = [
        f"data.train={digits['train']}",
        f"run.out_dir={small_disk}",
        "run.name=full",
        "train.max_steps=2",
    ]
    res = subprocess.run(
        [python(), "-m", "mimscale.train", "mae/cpu_tiny", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: no space left on device: could not write {run / first}"], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
