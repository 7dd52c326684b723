"""One writer per run directory, and ranks that die with the command that started them.

Two ``flock`` locks live in the run directory; the kernel drops a lock when the last process
holding it dies, however it dies (SIGKILL, OOM), so a stale lock never needs cleaning up:

- ``.owner.lock``, exclusive: held by the process that owns the run for its whole life: the
  ``mimscale train --nproc N`` command (taken before it spawns anything), else rank 0. Its
  content names the holder (``host pid``) for the refusal message.
- ``.ranks.lock``, shared: held by every rank of the run. An owner checks that nobody holds
  it before its ranks start, so ranks left running by a killed owner block a new run until
  they are gone.

A lock on a shared file system (NFS, Lustre with ``flock``) covers ranks on several nodes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OWNER = ".owner.lock"
RANKS = ".ranks.lock"
# Set by `mimscale train --nproc N` for the ranks it launches: its own pid, which holds the
# owner lock and whose death the ranks follow.
OWNER_ENV = "MIMSCALE_RUN_OWNER"
# Where rank 0 writes its exit status, for a caller whose launcher reports its own (torchrun: 1).
STATUS_ENV = "MIMSCALE_STATUS_FILE"


class RunDirBusy(RuntimeError):
    """Another live process writes this run directory. ``quiet``: another rank says why."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class RunDirLock:
    """The locks one process holds on a run directory; :meth:`release` (or exit) drops them."""

    def __init__(self, fds: list[int]):
        self._fds = fds

    def _take(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the only descriptor of a flock releases it
        self._fds = []

    def __del__(self) -> None:
        self.release()


def _me() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _holders(fd: int) -> str:
    """``PID p on host h`` for each identity line in a lock file (what its holders wrote)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    rows = [ln.split() for ln in text.splitlines()]
    names = [f"PID {row[1]} on host {row[0]}" for row in rows if len(row) >= 2]
    return ", ".join(names) or "an unknown process"


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def claim(run_dir: Path) -> RunDirLock:
    """Take the owner lock of ``run_dir`` (created if missing) and check that no rank of an
    earlier run is still alive; raise :class:`RunDirBusy` naming the holder otherwise."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = _open(run_dir / OWNER)
    if not _try_lock(owner, fcntl.LOCK_EX):
        who = _holders(owner)
        os.close(owner)
        raise RunDirBusy(
            f"{run_dir} is in use by {who} (it holds {run_dir / OWNER}); stop that run first, "
            f"or give this one another run.name"
        )
    try:
        with naming(run_dir / OWNER):
            os.ftruncate(owner, 0)
            os.pwrite(owner, (_me() + "\n").encode(), 0)
    except OSError:
        os.close(owner)
        raise
    ranks = _open(run_dir / RANKS)
    try:
        if not _try_lock(ranks, fcntl.LOCK_EX):  # a killed owner's ranks, not yet gone
            who = _holders(ranks)
            os.close(owner)
            raise RunDirBusy(
                f"{run_dir} is still written by ranks of an earlier run ({who}, holding "
                f"{run_dir / RANKS}); wait for them to exit or stop them"
            )
        os.ftruncate(ranks, 0)  # the identities of ranks long gone
    finally:
        os.close(ranks)
    return RunDirLock([owner])


def join(run_dir: Path) -> RunDirLock:
    """Take this rank's share of ``run_dir``'s rank lock (after its owner checked it was free)."""
    fd = _open(run_dir / RANKS)
    if not _try_lock(fd, fcntl.LOCK_SH):
        os.close(fd)
        raise RunDirBusy(f"{run_dir}: another run is checking {run_dir / RANKS}; start again")
    with open(run_dir / RANKS, "a") as f:  # O_APPEND: ranks on several nodes never overwrite
        f.write(_me() + "\n")
    return RunDirLock([fd])


def _owned_by_launcher(run_dir: Path) -> bool:
    """Whether ``mimscale train --nproc`` (our ``OWNER_ENV``) holds the owner lock for us."""
    pid = os.environ.get(OWNER_ENV)
    path = run_dir / OWNER
    if not pid or not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").split()
        held = not _try_lock(fd, fcntl.LOCK_SH)  # fails while the owner holds its exclusive lock
        return held and len(text) >= 2 and text[1] == pid
    finally:
        os.close(fd)


def hold_run_dir(run_dir: Path, dist: Any) -> RunDirLock:
    """Every rank of a run calls this once, after the process group exists and before anything
    is written under ``run_dir``; returns this rank's locks (held until :meth:`release` or exit).

    Rank 0 claims the directory unless the launching command already did; every rank agrees on
    the outcome (one collective), so a refused run ends on every rank with the same error.
    """
    from mimscale.engine.distributed import all_true

    locks, error = [], None
    if dist.rank == 0 and not _owned_by_launcher(run_dir):
        try:
            locks.append(claim(run_dir))
        except RunDirBusy as e:
            error = e
    if not all_true(error is None, dist.device):
        raise error or RunDirBusy(f"{run_dir} is in use (rank 0 says by whom)", quiet=True)
    joined = join(run_dir)
    return RunDirLock([fd for lk in [*locks, joined] for fd in lk._take()])


def die_with_owner() -> None:
    """Under ``mimscale train --nproc``: SIGKILL this process once that command has died.

    The launchers start ranks in a new session, so a SIGKILL (or OOM kill) of the command would
    otherwise leave the launcher and the ranks training on, beside a restarted run. A thread
    waits on a pidfd of the command (readable once it has exited); nothing is polled.
    """
    pid = os.environ.get(OWNER_ENV)
    if not pid:
        return
    try:
        fd = os.pidfd_open(int(pid))
    except ProcessLookupError:  # already gone before we got here
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="mimscale-owner-watch", daemon=True).start()


def kill_with_parent() -> None:
    """``preexec_fn`` of a launcher: the kernel SIGKILLs it when its parent (us) dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def write_status(code: int) -> int:
    """Record this rank-0 exit status where the launching command asked for it; return it."""
    path = os.environ.get(STATUS_ENV)
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{code}\n")
        os.replace(tmp, path)
    return code


def read_status(path: Path, launcher_rc: int) -> int:
    """The ranks' exit status when rank 0 recorded a failure or a stop (75), else the launcher's:
    a crash of rank 0 records nothing, and another rank may have failed after rank 0's 0."""
    rc = launcher_rc if launcher_rc >= 0 else 128 - launcher_rc  # killed by a signal: 128+N
    try:
        return int(path.read_text()) or rc
    except (OSError, ValueError):
        return rc


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an ``OSError`` raised in the block the file it was writing, where Python left it
    out (a buffered write fails at flush or close, without a file name)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def disk_full_line(e: OSError, where: Path | str) -> str | None:
    """The one line for a write that found the disk (or quota) full, or None for other errors."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return f"no space left on device: could not write {e.filename or f'a file under {where}'}"
