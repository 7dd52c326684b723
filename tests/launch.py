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


def nan_forward_script(bad_call: str, argv_from: int = 1, header: str = "import sys") -> str:
    """A child script that runs ``mimscale.train`` with MAE's forward returning a NaN loss on the
    forward calls where ``bad_call`` holds: a Python expression of ``n``, the call's 1-based count
    in this process (``header`` may define what it uses). The training arguments are
    ``sys.argv[argv_from:]``."""
    return f"""{header}
{nan_forward_patch(bad_call)}
from mimscale.train import main
sys.exit(main(sys.argv[{argv_from}:]))
"""


def nan_forward_patch(bad_call: str) -> str:
    """The lines of :func:`nan_forward_script` that patch MAE's forward (for scripts of their own)."""
    return f"""
from mimscale.methods import METHODS
_cls = METHODS["mae"]
_orig_forward = _cls.forward
_calls = [0]
def _nan_forward(self, batch, mask, targets=None):
    out = _orig_forward(self, batch, mask, targets)
    _calls[0] += 1
    n = _calls[0]
    return out._replace(loss=out.loss * float("nan")) if ({bad_call}) else out
_cls.forward = _nan_forward
"""
