"""Helpers for tests that start real launchers (`deepspeed`, `torchrun`, plain python)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cmd(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root; fail the test with its output if it fails."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in launcher_vars},
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        **(env or {}),
    }
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if out.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {out.returncode}\n--- stdout\n{out.stdout[-6000:]}\n"
            f"--- stderr\n{out.stderr[-6000:]}"
        )
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python() -> str:
    return sys.executable
