"""Save-on-signal outside Slurm: SIGTERM to a plain process, and to the whole `deepspeed` launcher
tree, between checkpoints. The run finishes its step, writes a complete checkpoint, exits 75; the
same command resumes and ends bitwise-equal to an uninterrupted run, every step logged once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, python, run_cmd

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")
STEPS = 12


def args_for(digits: dict, out: Path, name: str, **kw) -> list[str]:
    base = {
        "data.train": digits["train"],
        "run.out_dir": str(out),
        "run.name": name,
        "train.log_every": 1,
        "train.ckpt_every": 1000,  # no periodic checkpoint: only the signal writes one
        "train.log_keys": True,
        "train.max_steps": STEPS,
        "train.global_batch": 64,
        "data.num_workers": 1,
        "run.deterministic": True,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def fp32_weights(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=(ckpt / "LATEST").read_text().strip())


def kill_after(
    cmd: list[str], run: Path, step: int, sig: int = signal.SIGTERM
) -> subprocess.CompletedProcess:
    """Start ``cmd`` in its own process group; once ``step`` is logged, signal the whole group
    (what a scheduler or a container runtime does) and wait for the exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(records(run)) >= step:
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def assert_same_run(full: Path, part: Path, ranks: int) -> None:
    rf, rp = records(full), records(part)
    assert [r["step"] for r in rp] == list(range(1, STEPS + 1)), "each step must be logged exactly once"
    assert [r["loss"] for r in rp] == [r["loss"] for r in rf]
    for rank in range(ranks):  # the same samples, each step once, on every rank
        name = f"keys_rank{rank}.txt"
        assert (part / name).read_text().splitlines() == (full / name).read_text().splitlines()
    wf, wp = fp32_weights(full), fp32_weights(part)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)


@pytest.mark.slow
def test_sigterm_one_process_saves_and_resumes_exactly(digits, tmp_path) -> None:
    cmd = [python(), "-m", "mimscale.train", RECIPE]
    run_cmd([*cmd, *args_for(digits, tmp_path, "full")])
    part = tmp_path / "part"
    res = kill_after([*cmd, *args_for(digits, tmp_path, "part")], part, step=4)
    assert res.returncode == 75, res.stdout[-3000:]
    assert "stopped by SIGTERM" in res.stdout
    stopped = records(part)[-1]["step"]
    assert 4 <= stopped < STEPS
    # lost work: none; the checkpoint is the last finished step
    assert (part / "checkpoints" / "LATEST").read_text().strip() == f"step{stopped:08d}"
    out = run_cmd([*cmd, *args_for(digits, tmp_path, "part")])
    assert f"at step {stopped}" in out.stdout and out.stdout.count("[mimscale] done") == 1
    assert_same_run(tmp_path / "full", part, ranks=1)


@pytest.mark.slow
def test_sigterm_to_deepspeed_launcher_tree_saves_on_every_rank(digits, tmp_path) -> None:
    ds = shutil.which("deepspeed") or "deepspeed"

    def cmd(name: str) -> list[str]:
        args = args_for(digits, tmp_path, name, **{"train.micro_batch": 32})
        return [
            ds,
            "--num_gpus=2",
            f"--master_port={free_port()}",
            "--module",
            "mimscale.train",
            RECIPE,
            *args,
        ]

    out = run_cmd(cmd("full"))
    assert out.stdout.count("[mimscale] done") == 1  # rank 0 only
    part = tmp_path / "part"
    res = kill_after(cmd("part"), part, step=4)
    assert "stopped by" in res.stdout, res.stdout[-4000:]
    stopped = records(part)[-1]["step"]
    assert 4 <= stopped < STEPS
    assert (part / "checkpoints" / "LATEST").read_text().strip() == f"step{stopped:08d}"
    run_cmd(cmd("part"))
    assert_same_run(tmp_path / "full", part, ranks=2)
