"""slurm/pretrain.sbatch across two Slurm nodes (`.ci/slurm_2nodes.sh`: n1 and n2, two slurmd on
loopback): the rendezvous crosses the nodes and the weights equal a one-node run of the same world
size bitwise; an exact epoch over 2 nodes x 2 ranks x 2 workers reads every sample; preemption
across nodes resumes bitwise; losing a node ends the job promptly and a resubmission resumes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from slurm_helpers import REPO, sbatch, wait_done, wait_for
from test_slurm import fp32, latest, records, started, train_args

CONF = "/etc/slurm-2nodes/slurm.conf"
PRETRAIN = str(REPO / "slurm/pretrain.sbatch")
STEPS = 8
NODE_LOCAL = Path("/srv/mimscale-node-local")  # .ci/slurm_2nodes.sh: n2 sees an empty tmpfs there
pytestmark = [pytest.mark.slow]


def _cluster_problem() -> str | None:
    if not Path(CONF).is_file():
        return f"no two-node Slurm ({CONF} is missing); CI runs .ci/slurm_2nodes.sh up"
    env = {**os.environ, "SLURM_CONF": CONF}
    cmd = ["sinfo", "-h", "-N", "-o", "%N %t"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    up = {n for n, t in (line.split() for line in out.stdout.splitlines()) if re.match(r"idle|mix|alloc", t)}
    if out.returncode != 0 or up != {"n1", "n2", "n3"}:
        return f"the two-node Slurm has not n1, n2 (and n3) usable: {out.stdout.split()} {out.stderr.strip()}"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster2():
    """Every Slurm command of this module (and the jobs' own) talks to the two-node cluster."""
    problem = _cluster_problem() if shutil.which("sinfo") else "Slurm client commands are not installed"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"multi-node Slurm tests must run in CI: {problem}")
        pytest.skip(problem)
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = CONF
    yield
    if before is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = before


def args_for(data: str, out: Path, name: str, **kw) -> list[str]:
    """The one-node tests' arguments (test_slurm.train_args), with this module's step count."""
    return train_args({"train": data}, out, name, **{"train.max_steps": STEPS, **kw})


def submit(tmp: Path, args: list[str], nodes: int, per_node: int) -> tuple[str, Path]:
    name = next(a.split("=", 1)[1] for a in args if a.startswith("run.name="))
    log = tmp / f"{name}.out"
    opts = [f"--nodes={nodes}", "--cpus-per-task=2", f"--output={log}"]
    return sbatch([*opts, PRETRAIN, *args], cwd=tmp, NPROC_PER_NODE=str(per_node)), log


def run_job(tmp: Path, args: list[str], nodes: int, per_node: int) -> tuple[Path, str]:
    jid, log = submit(tmp, args, nodes, per_node)
    info = wait_done(jid, timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    return tmp / next(a.split("=", 1)[1] for a in args if a.startswith("run.name=")), text


def placement(text: str) -> dict[int, str]:
    """Global rank -> Slurm node, from the ranks' start lines."""
    found = re.findall(r"\[mimscale\] rank (\d+)/\d+ \(local \d+\) on \S+ \(slurm node (\w+)\)", text)
    return {int(r): node for r, node in found}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = fp32(a), fp32(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def digits12(tmp_path_factory) -> str:
    """The digits training split as 12 shards (1,438 samples): enough for 2 x 2 x 2 readers."""
    from mimscale.demo.data import write_digits_shards

    return write_digits_shards(tmp_path_factory.mktemp("digits12"), shard_size=128)["train"]


@pytest.fixture(scope="module")
def two_nodes(digits, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run on 2 nodes x 1 rank."""
    tmp = tmp_path_factory.mktemp("mn_ref")
    return run_job(tmp, args_for(digits["train"], tmp, "ref2x1"), nodes=2, per_node=1)


def test_two_nodes_one_rank_each_equal_one_node_bitwise(digits, tmp_path, two_nodes) -> None:
    run, text = two_nodes
    assert "2 node(s) x 1 rank(s)" in text
    assert sorted(placement(text).items()) in ([(0, "n1"), (1, "n2")], [(0, "n2"), (1, "n1")]), text[-3000:]
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))
    one, _ = run_job(tmp_path, args_for(digits["train"], tmp_path, "one1x2"), nodes=1, per_node=2)
    assert [r["loss"] for r in records(one)] == [r["loss"] for r in records(run)]
    for r in (0, 1):  # resampled epochs (the recipe's): each global rank reads the same stream
        assert (run / f"keys_rank{r}.txt").read_text() == (one / f"keys_rank{r}.txt").read_text()
    assert_same_weights(run, one)


def test_two_nodes_two_ranks_two_workers_read_an_exact_epoch_once(digits12, tmp_path) -> None:
    # 1,438 samples over 8 readers: ceil(180 / 16) = 12 batches per worker, 24 steps per epoch.
    kw = {"data.epoch_mode": "exact", "data.num_workers": 2, "train.micro_batch": 16, "train.max_steps": 24}
    run, text = run_job(tmp_path, args_for(digits12, tmp_path, "mn2x2", **kw), nodes=2, per_node=2)
    where = placement(text)
    assert sorted(where) == [0, 1, 2, 3] and Counter(where.values()) == {"n1": 2, "n2": 2}, text[-3000:]
    keys = Counter(k for r in range(4) for line in (run / f"keys_rank{r}.txt").read_text().splitlines()
                   for k in line.split())  # fmt: skip
    assert len(keys) == 1438  # every sample read
    assert sum(keys.values()) == 4 * 24 * 16  # and nothing else but the layout's 98 padding rows
    one, _ = run_job(tmp_path, args_for(digits12, tmp_path, "one1x4", **kw), nodes=1, per_node=4)
    for r in range(4):
        assert (run / f"keys_rank{r}.txt").read_text() == (one / f"keys_rank{r}.txt").read_text()
    assert_same_weights(run, one)


def test_preemption_across_nodes_requeues_and_ends_bitwise_equal(digits, tmp_path, two_nodes) -> None:
    ref, _ = two_nodes
    jid, log = submit(tmp_path, args_for(digits["train"], tmp_path, "pre"), nodes=2, per_node=1)
    run = tmp_path / "pre"
    wait_for(lambda: len(records(run)) >= 3, timeout=600, what="step 3 logged")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    info = wait_done(jid, timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    saved = int(re.search(r"checkpoint at step (\d+); requeueing", text).group(1))
    first = text.split("requeueing job")[0]
    done = [int(n) for n in re.findall(r"^step (\d+)/", first, re.M)]
    assert saved >= 3 and saved == done[-1]  # every step the first start finished is in the checkpoint
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1)), "a step was lost or logged twice"
    assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(ref)]
    assert_same_weights(ref, run)


def _ranks_on(node: str) -> list[int]:
    """Pids of the training ranks (not torchrun) that Slurm started on ``node``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"mimscale.train" in cmd and b"torch.distributed.run" not in cmd and b"LOCAL_RANK=0" in env:
            if f"SLURMD_NODENAME={node}".encode() in env:
                pids.append(int(proc.name))
    return pids


def test_losing_a_node_ends_the_job_and_a_resubmission_resumes(digits, tmp_path, two_nodes) -> None:
    ref, _ = two_nodes
    args = args_for(digits["train"], tmp_path, "lost", **{"train.ckpt_every": 2})
    jid, log = submit(tmp_path, args, nodes=2, per_node=1)
    run = tmp_path / "lost"
    wait_for(lambda: len(records(run)) >= 5, timeout=600, what="step 5 logged")
    victims = _ranks_on("n2")
    assert victims, "no rank found on n2"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # A hang guard, not a timing: without srun's --kill-on-bad-exit the ranks on n1 would wait in
    # their collective for DeepSpeed's process-group timeout (10 minutes).
    info = wait_done(jid, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    wait_for(lambda: not _ranks_on("n1"), timeout=60, what="the ranks on n1 to exit")
    resume_from = int(latest(run)[4:])
    assert resume_from >= 4 and resume_from % 2 == 0
    again, text = run_job(tmp_path, args, nodes=2, per_node=1)
    assert f"from step {resume_from}" in text and "resumed from" in text
    assert [r["step"] for r in records(again)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records(again)] == [r["loss"] for r in records(ref)]
    assert_same_weights(ref, again)


def test_a_node_that_never_joins_fails_the_rendezvous_within_its_timeout(digits, tmp_path) -> None:
    # PYTHON is the interpreter the batch script starts torchrun with: on n2 it never starts it.
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/bash\n[[ $SLURMD_NODENAME == n2 ]] && exec sleep 600\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    log = tmp_path / "never.out"
    opts = ["--nodes=2", "--cpus-per-task=2", f"--output={log}", PRETRAIN]
    env = {"PYTHON": str(python), "MIMSCALE_RDZV_TIMEOUT": "20", "NPROC_PER_NODE": "1"}
    jid = sbatch([*opts, *args_for(digits["train"], tmp_path, "never")], cwd=tmp_path, **env)
    wait_for(lambda: started(log, jid), timeout=300, what="job start")
    # A hang guard, not a timing: torchrun's own default join timeout is 600 s, so ending within
    # 300 s shows that MIMSCALE_RDZV_TIMEOUT reached it.
    info = wait_done(jid, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    assert "RendezvousTimeoutError" in text and "[mimscale] rank" not in text


def test_too_few_shards_for_the_allocation_is_one_line_before_any_rank(digits, tmp_path) -> None:
    # 6 shards; 2 nodes x 2 ranks x 2 workers = 8 readers: the batch script's check refuses it.
    kw = {"data.epoch_mode": "exact", "data.num_workers": 2, "train.micro_batch": 16}
    jid, log = submit(tmp_path, args_for(digits["train"], tmp_path, "few", **kw), nodes=2, per_node=2)
    info = wait_done(jid, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-3000:]
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "6 shards for 2 nodes x 2 ranks x 2 workers = 8 readers" in errors[0], text
    assert "start 1" not in text and "[mimscale] rank" not in text


def test_node_count_changes_two_one_two_resume_through_the_universal_checkpoint(digits, tmp_path) -> None:
    # ZeRO-2 partitions the optimizer state over the ranks: another node count must go through
    # DeepSpeed's universal checkpoint (engine/checkpoint.py), as on one node.
    kw = {"train.zero_stage": 2, "data.num_workers": 1}
    text = ""
    for nodes, steps in ((2, 2), (1, 4), (2, 6)):
        args = args_for(digits["train"], tmp_path, "nodes", **kw, **{"train.max_steps": steps})
        run, text = run_job(tmp_path, args, nodes=nodes, per_node=1)  # one log, appended
        assert latest(run) == f"step{steps:08d}"
    assert "world size 2 -> 1" in text and "world size 1 -> 2" in text, text[-4000:]
    assert text.count("resumed from") == 2
    assert [r["step"] for r in records(run)] == list(range(1, 7)), "a step was lost or logged twice"


def test_an_out_dir_the_second_node_cannot_see_stops_the_job_naming_it(digits, tmp_path) -> None:
    out = Path(tempfile.mkdtemp(dir=NODE_LOCAL))  # on n1 only: a node-local disk
    try:
        jid, log = submit(tmp_path, args_for(digits["train"], out, "local"), nodes=2, per_node=1)
        info = wait_done(jid, timeout=300)
        text = log.read_text()
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-3000:]
        named = [line for line in text.splitlines() if "cannot see" in line]
        assert named == [
            f"[mimscale] node n2 cannot see {out}/local/.shared.{jid}: run.out_dir must be on a "
            "filesystem shared by every node"
        ], text[-3000:]
        assert "start 1" not in text and "[mimscale] rank" not in text  # before any rank
        assert not list((out / "local").glob(".shared.*"))  # the marker is gone
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_first_node_whose_name_does_not_resolve_is_one_line(digits, tmp_path) -> None:
    log = tmp_path / "odd.out"
    opts = ["--partition=odd", "--nodes=1", "--cpus-per-task=2", f"--output={log}", PRETRAIN]
    jid = sbatch([*opts, *args_for(digits["train"], tmp_path, "odd")], cwd=tmp_path, NPROC_PER_NODE="1")
    info = wait_done(jid, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-3000:]
    line = "[mimscale] the first node's name n3 (of n3) does not resolve: no rendezvous possible"
    assert line in text.splitlines() and "start 1" not in text, text[-3000:]
