"""Helpers to drive jobs of the test Slurm (submit, poll, release a requeued job)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RELEASE_DELAY_S = 5
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job), trimmed of launcher variables."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")
    # SLURM_CONF stays: it names the cluster (the two-node one of test_multinode.py has its own).
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env = {k: v for k, v in keep.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    return env


def sbatch(args: list[str], cwd: Path, **env: str) -> str:
    """Submit; return the job id."""
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=job_env(**env), capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, f"sbatch {args}: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(jid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def wait_state(jid: str, states: set[str], timeout: float = 600, release: bool = True) -> dict[str, str]:
    """Poll until the job is in one of ``states``. A requeued job held until its BeginTime is
    released early (``release``): Slurm otherwise waits ~2 minutes before restarting it. Not at
    once: slurmd revoked the old incarnation's credential at the requeue, in whole seconds, and
    refuses ("Job credential revoked") a start stamped in that same second, which fails the job."""
    deadline = time.time() + timeout
    released: set[str] = set()  # the restart counts already released (each update resets the begin)
    while time.time() < deadline:
        info = job_info(jid)
        state = info.get("JobState", "")
        if state in states:
            return info
        restarts = info.get("Restarts", "")
        if release and state == "PENDING" and info.get("Reason") == "BeginTime" and restarts not in released:
            subprocess.run(["scontrol", "update", f"JobId={jid}", f"StartTime=now+{RELEASE_DELAY_S}"],
                           capture_output=True)  # fmt: skip
            released.add(restarts)
        time.sleep(1)
    raise AssertionError(f"job {jid} not in {states} after {timeout} s: {job_info(jid)}")


def wait_done(jid: str, timeout: float = 600) -> dict[str, str]:
    return wait_state(jid, FINAL, timeout)


def wait_for(pred, timeout: float = 600, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
