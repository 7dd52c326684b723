"""One writer per run directory: the owner lock, the rank lock, and ranks that die with the
`mimscale train --nproc` command that started them (SIGKILL included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launch import REPO

from mimscale.engine.rundir import OWNER_ENV, RunDirBusy, claim, join

# A process that takes the owner lock (or, with "rank", only a rank's share) and waits.
HOLDER = r"""
import sys, time
from pathlib import Path
from mimscale.engine import rundir
run = Path(sys.argv[1])
lock = rundir.join(run) if sys.argv[2] == "rank" else rundir.claim(run)
open(sys.argv[3], "w").close()
time.sleep(600)
"""


def start_holder(run: Path, role: str, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / f"ready.{role}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), role, str(ready)], cwd=REPO)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "the holder did not start"
        time.sleep(0.05)
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_live_owner_is_named_and_its_death_frees_the_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = start_holder(run, "owner", tmp_path)
    for _ in range(2):  # refused every time while it lives, and nothing is taken from it
        with pytest.raises(RunDirBusy) as e:
            claim(run)
        msg = str(e.value)
        assert f"PID {holder.pid} on host {socket.gethostname()}" in msg and str(run) in msg
        assert "\n" not in msg and "run.name" in msg
    kill9(holder)  # no cleanup runs: the kernel drops the lock
    claim(run).release()


def test_ranks_left_by_a_dead_owner_block_a_new_run_until_they_exit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    claim(run).release()  # the owner is gone ...
    orphan = start_holder(run, "rank", tmp_path)  # ... one of its ranks is not
    with pytest.raises(RunDirBusy) as e:
        claim(run)
    assert f"PID {orphan.pid} on host" in str(e.value) and "earlier run" in str(e.value)
    kill9(orphan)
    lock = claim(run)
    rank = join(run)  # the new run's ranks share the rank lock
    with pytest.raises(RunDirBusy):
        claim(run)
    rank.release()
    lock.release()


def test_ranks_of_the_owning_command_trust_its_lock_only_when_it_holds_it(tmp_path, monkeypatch) -> None:
    from mimscale.engine.rundir import _owned_by_launcher

    run = tmp_path / "run"
    holder = start_holder(run, "owner", tmp_path)
    monkeypatch.setenv(OWNER_ENV, str(holder.pid))
    assert _owned_by_launcher(run)
    monkeypatch.setenv(OWNER_ENV, str(os.getpid()))  # a pid that does not hold it
    assert not _owned_by_launcher(run)
    monkeypatch.setenv(OWNER_ENV, str(holder.pid))
    kill9(holder)
    assert not _owned_by_launcher(run)  # its file still names it, but nobody holds the lock


@pytest.mark.slow
def test_any_entrance_is_refused_in_one_line_while_the_directory_is_held(digits, tmp_path) -> None:
    """`python -m mimscale.train` (what deepspeed, torchrun and srun run) takes the lock itself."""
    holder = start_holder(tmp_path / "one", "owner", tmp_path)
    cmd = [sys.executable, "-m", "mimscale.train", "mae/cpu_tiny", *_args(digits, tmp_path, 2)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", OWNER_ENV)}
    out = subprocess.run(cmd, cwd=REPO, env={**env, "WANDB_MODE": "disabled"}, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"error: {tmp_path / 'one'} is in use by PID {holder.pid}" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "one" / "recipe.yaml").exists()
    kill9(holder)


def _args(digits: dict, out: Path, steps: int) -> list[str]:
    return [
        f"data.train={digits['train']}", f"run.out_dir={out}", "run.name=one", "train.log_every=1",
        "train.ckpt_every=2", f"train.max_steps={steps}", "train.global_batch=64",
        "train.micro_batch=32", "data.num_workers=1",
    ]  # fmt: skip


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]


@pytest.mark.slow
def test_sigkill_of_nproc_command_kills_its_ranks_and_the_lock_refuses_meanwhile(digits, tmp_path) -> None:
    """`kill -9` of `mimscale train --nproc 2`: the launcher and both ranks die within a bound; a
    second start is refused in one line while the first lives; a restart then resumes with every
    step in metrics.jsonl once (was: orphans trained on beside the restart, steps doubled)."""
    steps, run = 500, tmp_path / "one"  # far more than it gets to: killed while training
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "mimscale.cli", "train", "mae/cpu_tiny", "--nproc", "2"]
    cmd += _args(digits, tmp_path, steps)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while len(_steps(run)) < 3:
        assert first.poll() is None and time.time() < deadline, "the first run did not reach step 3"
        time.sleep(0.1)
    tree = psutil.Process(first.pid).children(recursive=True)
    assert len([p for p in tree if "mimscale.train" in " ".join(p.cmdline())]) >= 2  # the ranks

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"PID {first.pid} on host {socket.gethostname()}" in lines[0], lines

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gone, alive = psutil.wait_procs(tree, timeout=60)  # a bound, not a speed: 60 s on 2 busy cores
    assert not alive, [p.cmdline() for p in alive]
    killed_at = max(_steps(run))
    assert killed_at < steps, "the first run finished before the kill: nothing was tested"

    end = killed_at + 3  # the restart resumes from the last checkpoint and runs a few steps past the kill
    third = subprocess.run(
        [*cmd, f"train.max_steps={end}"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "resumed from" in third.stdout
    assert _steps(run) == list(range(1, end + 1)), "each step must be logged exactly once"
