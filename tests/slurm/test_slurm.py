"""The real Slurm templates on a real one-node Slurm: 2-rank pre-training, preemption with
save-on-signal and requeue (bitwise-equal to an uninterrupted run), no endless requeue, two jobs
sharing a node, the no-GPU path, the shard-prep array job, and eval of a checkpoint."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from slurm_helpers import REPO, job_env, sbatch, wait_done, wait_for, wait_state

PRETRAIN = str(REPO / "slurm/pretrain.sbatch")
STEPS = 8
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm")]


def train_args(digits: dict, out: Path, name: str, **kw) -> list[str]:
    base = {
        "data.train": digits["train"],
        "run.out_dir": str(out),
        "run.name": name,
        "run.deterministic": True,
        "train.log_every": 1,
        "train.ckpt_every": 1000,  # only the end (or a preemption) writes a checkpoint
        "train.log_keys": True,
        "train.max_steps": STEPS,
        "train.global_batch": 64,
        "train.micro_batch": 32,
        "data.num_workers": 0,
    }
    base.update(kw)
    return ["mae/cpu_tiny", *(f"{k}={v}" for k, v in base.items())]


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def latest(run: Path) -> str:
    return (run / "checkpoints" / "LATEST").read_text().strip()


def fp32(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=latest(run))


def started(log: Path, jid: str) -> bool:
    """The batch script of job ``jid`` has printed its start line (its USR1 trap is installed)."""
    return log.is_file() and f"job {jid} start" in log.read_text()


def submit_pretrain(tmp: Path, args: list[str], opts: list[str] = (), **env: str) -> tuple[str, Path]:
    log = tmp / f"{args[3].split('=')[1]}.out"  # run.name
    jid = sbatch([*opts, "--cpus-per-task=2", f"--output={log}", PRETRAIN, *args], cwd=tmp, **env)
    return jid, log


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run; its ranks come from the two (fake) GPUs of the allocation."""
    tmp = tmp_path_factory.mktemp("slurm_ref")
    jid, log = submit_pretrain(tmp, train_args(digits, tmp, "ref"), ["--gpus-per-node=2"])
    info = wait_done(jid)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert "1 node(s) x 2 rank(s)" in log.read_text()
    return tmp / "ref"


def test_two_rank_job_completes_with_checkpoint(reference: Path) -> None:
    assert latest(reference) == f"step{STEPS:08d}"
    assert [r["step"] for r in records(reference)] == list(range(1, STEPS + 1))
    assert (reference / "keys_rank1.txt").is_file()  # two ranks trained


def test_preempted_job_saves_requeues_and_ends_bitwise_equal(digits, tmp_path, reference: Path) -> None:
    jid, log = submit_pretrain(tmp_path, train_args(digits, tmp_path, "pre"), ["--gpus-per-node=2"])
    run = tmp_path / "pre"
    wait_for(lambda: len(records(run)) >= 3, what="step 3 logged")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    info = wait_done(jid)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "requeueing job" in text and "resumed from" in text
    steps = [r["step"] for r in records(run)]
    assert steps == list(range(1, STEPS + 1)), "a step was lost or logged twice"
    assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(reference)]
    for rank in (0, 1):
        name = f"keys_rank{rank}.txt"
        assert (run / name).read_text() == (reference / name).read_text()
    wa, wb = fp32(reference), fp32(run)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_signalled_job_stops_requeueing(digits, tmp_path) -> None:
    # Signalled as soon as it starts, with no restarts allowed: it saves what it did and ends.
    args = train_args(digits, tmp_path, "cap")
    jid, log = submit_pretrain(tmp_path, args, MIMSCALE_MAX_RESTARTS="0")
    wait_for(lambda: started(log, jid), what="job start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    info = wait_done(jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log.read_text()[-3000:]
    assert "restart cap reached" in log.read_text()
    saved = int(latest(tmp_path / "cap")[4:])
    assert 1 <= saved < STEPS
    # The same run cannot advance (max_steps = what it has): signalled, it must not requeue.
    args = train_args(digits, tmp_path, "cap", **{"train.max_steps": saved})
    jid, log = submit_pretrain(tmp_path, args)
    # the same log file (same run name, append mode): this job's own start line, not the first's
    wait_for(lambda: started(log, jid), what="second job start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    info = wait_done(jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert "no progress since this start" in log.read_text()


def test_two_jobs_on_one_node_both_finish(digits, tmp_path) -> None:
    jobs = [
        submit_pretrain(tmp_path, train_args(digits, tmp_path, f"pair{i}", **{"train.max_steps": 3}),
                        NPROC_PER_NODE="2")
        for i in range(2)
    ]  # fmt: skip
    for jid, _ in jobs:
        wait_state(jid, {"RUNNING", "COMPLETED"})
    infos = [wait_done(jid) for jid, _ in jobs]
    for info, (_, log) in zip(infos, jobs, strict=True):
        assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    # they really overlapped (each had two ranks and its own rendezvous port)
    assert infos[0]["StartTime"] <= infos[1]["EndTime"] and infos[1]["StartTime"] <= infos[0]["EndTime"]


def test_no_gpu_allocation_runs_one_rank(digits, tmp_path) -> None:
    args = train_args(digits, tmp_path, "cpu", **{"train.max_steps": 2, "train.micro_batch": 64})
    jid, log = submit_pretrain(tmp_path, args)
    info = wait_done(jid)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert "1 node(s) x 1 rank(s)" in log.read_text()
    assert latest(tmp_path / "cpu") == "step00000002"


def _tree_digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_prep_shards_array_equals_one_process(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    for c in ("a", "b", "c"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((10, 14, 3), 17 * i, np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
    one = [
        "mimscale",
        "prep-shards",
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "one" / "shards"),
    ]
    subprocess.run([*one, "--shard-size", "2", "--no-progress"], check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"  # not the repository: the template must not need it
    elsewhere.mkdir()
    jid = sbatch(["--array=0-2", "--cpus-per-task=1", f"--output={elsewhere}/prep-%a.out",
                  str(REPO / "slurm/prep_shards.sbatch"), "../src", "../array/shards", "--shard-size", "2"],
                 cwd=elsewhere)  # fmt: skip
    # same folder name on both sides: shard names derive from it
    wait_for(
        lambda: (tmp_path / "array" / "shards" / "manifest.json").is_file(),
        timeout=600,
        what="merged manifest",
    )
    for task in range(3):
        wait_done(f"{jid}_{task}")
    one_dir, arr_dir = tmp_path / "one" / "shards", tmp_path / "array" / "shards"
    assert _tree_digest(arr_dir) == _tree_digest(one_dir)
    assert len(_tree_digest(one_dir)) == 8  # 15 images, 2 per shard
    one = json.loads((one_dir / "manifest.json").read_text())
    arr = json.loads((arr_dir / "manifest.json").read_text())
    assert arr["shards"] == one["shards"]


def test_eval_template_evaluates_a_checkpoint(digits, tmp_path, reference: Path) -> None:
    out = tmp_path / "eval"
    script = str(REPO / "slurm/eval.sbatch")
    args = ["eval", str(reference), "--data", digits["val"], "--train", digits["train"], "--out", str(out)]
    jid = sbatch([f"--output={tmp_path}/eval.out", "--cpus-per-task=2", script, *args], cwd=tmp_path)
    info = wait_done(jid)
    assert info["JobState"] == "COMPLETED", (tmp_path / "eval.out").read_text()[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["num_val"] == 359 and 20.0 < res["knn_top1"] <= 100.0, res  # percent; chance is 10


def test_launch_lines_pass_sbatch_test_only() -> None:
    """Every sbatch line of README.md and the recipe headers, as Slurm itself validates it. The
    one-node CI cluster has 2 (fake) GPUs: node and GPU counts are capped to what it has."""
    from test_launch_lines import ALL

    lines = [(where, line) for where, line in ALL if line.startswith("sbatch ")]
    assert len(lines) >= 25
    for where, line in lines:
        argv = shlex.split(line)
        for i, a in enumerate(argv[:-1]):
            if a in ("--nodes", "-N"):
                argv[i + 1] = "1"
            if a == "--gpus-per-node":
                argv[i + 1] = "2"
        argv.insert(1, "--test-only")
        out = subprocess.run(argv, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "to start at" in out.stderr, f"{where}: {line}: {out.stderr}"
