"""A running one-node Slurm (`.ci/slurm_up.sh` starts one in CI), and helpers to drive its jobs.

Locally the Slurm tests skip, saying why, when no Slurm answers; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm client commands (sbatch, sinfo) are not installed; CI runs .ci/slurm_up.sh"
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"no Slurm controller answers (sinfo: {out.stderr.strip()}); CI runs .ci/slurm_up.sh"
    if not re.search(r"^(idle|mix|alloc)", out.stdout, re.M):
        return f"no usable Slurm node (sinfo states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Slurm tests must run in CI: {problem}")
        pytest.skip(problem)
