"""The documented exit status of a graceful stop, 75, on the `mimscale train --nproc` launch paths:
SIGTERM and SIGUSR1 to the command, through the deepspeed launcher and through torchrun. Each
stopped run resumes and ends with every step logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, free_port


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]


def _assert_no_shm_buffers(pid: int, port: int) -> None:
    """The ranks map none of DeepSpeed's /dev/shm all-reduce buffers (named after MASTER_PORT,
    here our port): its shared-memory op is never built on a CPU, so a kill leaves nothing in
    /dev/shm. Before, each rank mapped one and killed runs left them behind (13 GB once)."""
    import psutil

    name = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    children = psutil.Process(pid).children(recursive=True)
    ranks = [p for p in children if "mimscale.train" in " ".join(p.cmdline())]
    assert ranks, "no rank process found: nothing was tested"
    maps = [ln for p in ranks for ln in Path(f"/proc/{p.pid}/maps").read_text().splitlines() if name in ln]
    assert not maps, maps
    assert not list(Path("/dev/shm").glob(f"{name}*_{port}_*"))


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "sig"), [("deepspeed", "SIGUSR1"), ("torchrun", "SIGTERM")])
def test_signalled_nproc_run_saves_and_exits_75(digits, tmp_path: Path, launcher: str, sig: str) -> None:
    """Was 246 (deepspeed, SIGUSR1: the launcher died of it) and 1 (torchrun reports 1 for any
    rank that exits non-zero). The other two pairs share every line of the path these take."""
    steps, run = 400, tmp_path / "one"  # far more than it gets to: stopped while training
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("MIMSCALE_STOP_FILE", None)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mimscale.cli",
        "train",
        "mae/cpu_tiny",
        "--nproc",
        "2",
        "--launcher",
        launcher,
    ]
    cmd += ["--master-port", str(port)]
    cmd += [
        f"data.train={digits['train']}", f"run.out_dir={tmp_path}", "run.name=one", "train.log_every=1",
        "train.ckpt_every=1000", "train.global_batch=64", "train.micro_batch=32", "data.num_workers=1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*cmd, f"train.max_steps={steps}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while len(_steps(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run did not reach step 2"
        time.sleep(0.1)
    _assert_no_shm_buffers(proc.pid, port)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-4000:]
    assert f"stopped by {sig} to mimscale train" in out and "Traceback" not in out
    stopped = _steps(run)[-1]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == f"step{stopped:08d}"
    end = stopped + 2
    res = subprocess.run([*cmd, f"train.max_steps={end}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"at step {stopped}" in res.stdout
    assert _steps(run) == list(range(1, end + 1)), "each step must be logged exactly once"
