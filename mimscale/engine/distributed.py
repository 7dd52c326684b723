"""Process-group setup that works the same under `deepspeed`, `torchrun` and a plain process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU).

    A plain ``python -m mimscale.train`` (no launcher) becomes a world of one with a private
    TCP rendezvous; under a launcher the usual env:// variables are used.
    """
    import deepspeed

    skip_cpu_shm_allreduce()
    single = "RANK" not in os.environ  # no launcher: a world of one
    # DeepSpeed's engine reads LOCAL_RANK from the environment. The rendezvous of a world of one
    # is passed explicitly rather than through RANK/MASTER_PORT env vars, which child processes
    # (launchers started from the same Python process, e.g. tests) would otherwise inherit.
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        if single:
            deepspeed.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, rank=0, world_size=1,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
            )  # fmt: skip
        else:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    info = DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )
    if info.world_size > 1:  # where each rank landed: what to read first when a multi-node run misbehaves
        # one write, newline included: the ranks of a node share one output file
        line = f"[mimscale] rank {info.rank}/{info.world_size} (local {local_rank}) on {_where()}\n"
        print(line, end="", flush=True)
    return info


def _where() -> str:
    """This host's name, with Slurm's node name when they differ (several slurmd on one host)."""
    host = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME")
    return host if not node or node == host else f"{host} (slurm node {node})"


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed from compiling and mapping its CPU shared-memory all-reduce.

    On a CPU, DeepSpeed's ``TorchBackend`` compiles that op when it sets up the process group
    (45-100 s on 2 cores, again in each new virtual environment: a new user's first run paid
    it) and maps one /dev/shm buffer per local rank that it never unlinks (13 GB once, from
    killed runs). The op serves only ``inference_all_reduce``, which training never calls and
    which falls back to torch.distributed without it. DeepSpeed keeps its op registry as one
    module-level dict whose edits persist (``deepspeed.ops.__compatible_ops__``); an op marked
    incompatible there is one DeepSpeed does not build. Call before DeepSpeed sets up its
    communication; a no-op where the accelerator is not the CPU.
    """
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (one scalar all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class StopRequest:
    """Save-on-signal: SIGTERM / SIGUSR1 (or a stop file) asks every rank to stop after the step.

    Launchers forward the signal to some ranks, at slightly different times, or to none (Slurm
    signals only the batch script, which creates ``$MIMSCALE_STOP_FILE`` instead: a file
    reaches ranks on every node and never kills torchrun or the data workers). Ranks therefore
    never act on their own flag: :meth:`poll` all-reduces it once per step, so all ranks stop
    after the same step and the checkpoint they write together is complete.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, watch_file: bool = True) -> None:
        self.signal: str | None = None
        # One rank watching the file is enough (the flag is all-reduced); spares a shared file system.
        self.stop_file = (os.environ.get("MIMSCALE_STOP_FILE") or None) if watch_file else None
        self._group: Any = None  # the gloo group of the lagged stop reduce (made at the first poll)
        self._pending: tuple[Any, torch.Tensor] | None = None

    def install(self) -> None:
        """Install the handlers (main thread only). Data workers forked later inherit them, so a
        signal sent to the whole process tree does not kill them mid-step."""
        import signal

        self._previous = {name: signal.signal(getattr(signal, name), self._handler) for name in self.SIGNALS}

    def uninstall(self) -> None:
        """Restore the previous handlers: once training is over, SIGTERM ends the process again."""
        import signal

        for name, handler in getattr(self, "_previous", {}).items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}

    def _handler(self, signum: int, frame: object) -> None:
        import signal

        self.signal = signal.Signals(signum).name

    def local(self) -> bool:
        if self.signal is None and self.stop_file and os.path.exists(self.stop_file):
            try:  # `mimscale train --nproc` writes the signal it got; an sbatch only touches it
                why = Path(self.stop_file).read_text().strip()
            except OSError:
                why = ""
            self.signal = why or f"stop file {self.stop_file}"
        return self.signal is not None

    def poll(self) -> bool:
        """True on every rank once any rank was asked to stop, one step late, without a sync.

        Each call starts an asynchronous max-reduce of this rank's flag over a CPU (gloo) group
        and returns the result of the previous call's reduce, which has long finished: the
        training device never waits for it. Every rank calls this once per step, so the answers
        agree; a world of one reads its own flag at once.
        """
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return self.local()
        if self._group is None:  # collective: every rank reaches its first poll at the same step
            self._group = torch.distributed.new_group(backend="gloo")
        agreed = self._pending is not None and self._wait() > 0.5
        flag = torch.tensor([1.0 if self.local() else 0.0])
        work = torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True
        )
        self._pending = (work, flag)
        return agreed

    def _wait(self) -> float:
        assert self._pending is not None  # poll() only waits on a reduce it started
        work, flag = self._pending
        self._pending = None
        work.wait()
        return float(flag.numpy()[0])  # a CPU tensor: reading it waits for no device

    def drain(self) -> None:
        """Finish the outstanding reduce (every rank has one) before the run ends."""
        if self._pending is not None:
            self._wait()
