"""DeepSpeed's CPU shared-memory all-reduce is neither built nor mapped: the op costs 45-100 s of
compiling on 2 cores in each new virtual environment (a new user's first ``mimscale demo``) and a
/dev/shm buffer per rank that killed runs left behind, for an inference collective training never
calls. Both places that set up DeepSpeed's communication are checked, each in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = {
    # the trainer's path: init_distributed, then deepspeed.initialize
    "init_distributed": (
        "from mimscale.engine.distributed import init_distributed; init_distributed()\n"
        "import torch, deepspeed\n"
        "deepspeed.initialize(model=torch.nn.Linear(2, 2), config={'train_batch_size': 1, "
        "'optimizer': {'type': 'SGD', 'params': {'lr': 0.1}}})\n"
    ),
    # precompute's offloaded teacher: a group of its own, then deepspeed.initialize (ZeRO-3)
    "precompute": (
        "import torch\n"
        "from mimscale.targets.precompute import _world_of_one; _world_of_one(torch.device('cpu'))\n"
        "import deepspeed\n"
        "deepspeed.initialize(model=torch.nn.Linear(2, 2), config={'train_batch_size': 1, "
        "'zero_optimization': {'stage': 3}})\n"
    ),
}
CHECK = (
    "import deepspeed.comm.comm as c, deepspeed.ops as o, os\n"
    "assert c.cdb is not None and c.cdb.shm_comm_op is None, c.cdb\n"
    "assert o.__compatible_ops__['deepspeed_shm_comm'] is False\n"
    "maps = open(f'/proc/{os.getpid()}/maps').read()\n"
    "assert 'deepspeed_allreduce_buffer' not in maps\n"
    "print('ok')\n"
)


@pytest.mark.parametrize("path", sorted(CODE))
def test_deepspeed_builds_no_cpu_shared_memory_allreduce(path: str) -> None:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CODE[path] + CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert "deepspeed_shm_comm" not in out.stdout + out.stderr  # nothing compiled, nothing loaded
