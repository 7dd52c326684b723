"""End to end on real digits shards: the real `deepspeed` launcher (gloo on CPU), torchrun,
one process; exact resume for ZeRO-2 and ZeRO-3; a kill during checkpoint save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, nan_forward_script, python, run_cmd

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")


def overrides(digits: dict, out: Path, name: str, **kw) -> list[str]:
    base = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(out),
        "run.name": name,
        "train.log_every": 1,
        "train.ckpt_every": 1000,
        "train.log_keys": True,
        "train.global_batch": 64,
        "train.micro_batch": 32,
        "data.num_workers": 1,
        "train.recon_every": 4,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def deepspeed_cmd(args: list[str]) -> list[str]:
    exe = shutil.which("deepspeed") or "deepspeed"
    return [exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train", RECIPE, *args]


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the latest checkpoint (DeepSpeed's ZeRO tool, weights-only reads)."""
    from mimscale.eval.ckpt import method_state_dict

    return method_state_dict(run_dir)


def keys(run_dir: Path, rank: int) -> list[str]:
    return (run_dir / f"keys_rank{rank}.txt").read_text().split()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_two_ranks_loss_falls_and_resume_is_exact(digits, tmp_path, stage: int) -> None:
    n = 6
    full = overrides(digits, tmp_path, "full", **{"train.zero_stage": stage, "train.max_steps": 2 * n})
    run_cmd(deepspeed_cmd(full))
    part = overrides(digits, tmp_path, "part", **{"train.zero_stage": stage, "train.max_steps": n})
    run_cmd(deepspeed_cmd(part))
    out = run_cmd(deepspeed_cmd([*part[:-1], f"train.max_steps={2 * n}"]))
    assert "resumed from" in out.stdout + out.stderr

    lf = losses(tmp_path / "full")
    assert len(lf) == 2 * n and all(map(lambda x: x == x, lf))
    assert sum(lf[-3:]) / 3 < sum(lf[:3]) / 3, f"loss did not fall: {lf}"
    for rank in (0, 1):  # the same samples, in the same order, on every rank
        assert keys(tmp_path / "full", rank) == keys(tmp_path / "part", rank)
    wf, wp = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert wf.keys() == wp.keys()
    worst = max((wf[k] - wp[k]).abs().max().item() for k in wf)
    assert worst == 0.0, f"resume diverged by {worst}"
    assert lf[n:] == losses(tmp_path / "part")[n:]
    # pictures every 4 steps under ZeRO-2/3 on two ranks (collective), exact resume untouched
    pictures = sorted(p.name for p in (tmp_path / "full" / "images").glob("*.png"))
    assert pictures == [f"recon_step{s:08d}.png" for s in (4, 8, 12)]


@pytest.mark.slow
def test_torchrun_and_single_process_run_the_same_recipe(digits, tmp_path) -> None:
    args = overrides(digits, tmp_path, "tr", **{"train.max_steps": 3})
    run_cmd(
        [
            python(),
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "mimscale.train",
            RECIPE,
            *args,
        ]
    )
    assert len(losses(tmp_path / "tr")) == 3
    args = overrides(digits, tmp_path, "one", **{"train.max_steps": 3, "train.micro_batch": 64})
    out = run_cmd([python(), "-m", "mimscale.train", RECIPE, *args])
    assert "world 1" in out.stdout
    assert len(losses(tmp_path / "one")) == 3
    assert (tmp_path / "one" / "recipe.yaml").is_file()
    ckpt = tmp_path / "one" / "checkpoints"
    tag = (ckpt / "LATEST").read_text().strip()
    assert (ckpt / tag / "recipe.yaml").is_file()


KILL_DURING_SAVE = r"""
import os, sys, torch
import mimscale.engine.checkpoint as ck
calls = {"n": 0}
orig = ck.save
def dying_save(engine, ckpt_dir, step, *a, **k):
    calls["n"] += 1
    if calls["n"] == 2:   # the second checkpoint: DeepSpeed writes part of it, then the process dies
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}", client_state={}, save_latest=False)
        os._exit(17)
    return orig(engine, ckpt_dir, step, *a, **k)
ck.save = dying_save
from mimscale.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_previous(digits, tmp_path) -> None:
    script = tmp_path / "die.py"
    script.write_text(KILL_DURING_SAVE)
    args = overrides(
        digits, tmp_path, "k", **{"train.max_steps": 6, "train.ckpt_every": 2, "train.micro_batch": 64}
    )
    import subprocess

    res = subprocess.run(
        [python(), str(script), RECIPE, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 17, res.stdout + res.stderr
    ckpt = tmp_path / "k" / "checkpoints"
    assert (ckpt / "step00000004").is_dir()  # the half-written checkpoint is there...
    assert (ckpt / "LATEST").read_text().strip() == "step00000002"  # ...but never named
    out = run_cmd([python(), "-m", "mimscale.train", RECIPE, *args])
    assert "resumed from" in out.stdout and "step00000002" in out.stdout
    assert (ckpt / "LATEST").read_text().strip() == "step00000006"


# Forward calls listed in argv[1] (comma-separated) return a NaN loss.
NAN_SCRIPT = nan_forward_script(
    "n in BAD", argv_from=2, header='import sys\nBAD = set(int(x) for x in sys.argv[1].split(","))'
)


@pytest.mark.slow
def test_nan_steps_are_skipped_then_reload_then_stop(digits, tmp_path) -> None:
    import subprocess

    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT)
    args = overrides(
        digits,
        tmp_path,
        "n",
        **{"train.max_steps": 8, "train.ckpt_every": 2, "train.micro_batch": 64, "train.nan_patience": 2},
    )
    # one isolated bad step is skipped; the run completes all 8 steps
    res = subprocess.run(
        [python(), str(script), "3", RECIPE, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "non-finite loss, step skipped" in res.stdout
    recs = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 8 and recs[-1]["bad_steps"] == 1
    # from call 5 on every loss is NaN: 2 bad -> reload step-2 checkpoint -> 2 bad -> stop
    args2 = [a.replace("run.name=n", "run.name=n2") for a in args]
    res = subprocess.run(
        [python(), str(script), ",".join(map(str, range(5, 40))), RECIPE, *args2],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 3, res.stdout + res.stderr  # EXIT_NONFINITE, documented
    assert "reloading last good checkpoint" in res.stdout
    assert "consecutive non-finite losses at step" in res.stderr and "step00000004" in res.stderr
    assert "Traceback" not in res.stderr  # one line says why (was a NonFiniteLossError traceback)
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")] == [
        ln for ln in res.stderr.splitlines() if "consecutive non-finite" in ln
    ]
