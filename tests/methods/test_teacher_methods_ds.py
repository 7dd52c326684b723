"""Teacher methods under the real `deepspeed` launcher, 2 CPU processes (gloo), real digits shards:
CAE v2 and MR-MAE under ZeRO-2 (the loss falls), and MR-MAE under ZeRO-3 with its teacher
outside the student's engine, offloaded through DeepSpeed ZeRO-Inference (a separate engine).
In every run the teacher is in no optimizer group and in no checkpoint. ~40-50 s per run
(launcher start-up dominates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, run_cmd

from mimscale.methods import build_method
from mimscale.registry import load_recipe

STEPS = 6


def overrides(digits: dict, out: Path, name: str, **kw) -> list[str]:
    base = {
        "data.train": digits["train"], "data.val": digits["val"], "run.out_dir": str(out), "run.name": name,
        "train.log_every": 1, "train.max_steps": STEPS, "train.global_batch": 32, "train.micro_batch": 16,
        "data.num_workers": 0, "optim.warmup_epochs": 0,
    }  # fmt: skip
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def run(method: str, args: list[str]) -> None:
    exe = shutil.which("deepspeed") or "deepspeed"
    recipe = str(REPO / f"recipes/{method}/cpu_tiny.yaml")
    run_cmd(
        [exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train", recipe, *args]
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_loss_falls(recs: list[dict], key: str = "loss") -> None:
    values = [r[key] for r in recs]
    assert len(values) == STEPS and all(v == v for v in values)
    assert sum(values[-2:]) / 2 < 0.9 * sum(values[:2]) / 2, f"{key} did not fall: {values}"


def check_teacher_not_saved(method: str, args: list[str], run_dir: Path) -> None:
    """Optimizer groups and checkpoint hold exactly the student's parameters (DeepSpeed's own
    record of what it optimises: ``param_shapes``; frozen ones: ``frozen_param_shapes``)."""
    student = build_method(load_recipe(REPO / f"recipes/{method}/cpu_tiny.yaml", args))
    trainable = {n: p.shape for n, p in student.named_parameters() if p.requires_grad}
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "LATEST").read_text().strip()
    for states in sorted(ckpt.glob("*model_states.pt")):
        sd = torch.load(states, map_location="cpu", weights_only=False)
        optimised = {n: s for group in sd["param_shapes"] for n, s in group.items()}
        assert optimised == trainable
        assert set(sd["frozen_param_shapes"] or {}) <= set(student.state_dict())
        assert set(sd["module"] or {}) <= set(student.state_dict())  # no teacher tensor saved


@pytest.mark.slow
def test_cae_v2_zero2_loss_falls(digits, tmp_path) -> None:
    args = overrides(digits, tmp_path, "cae", **{"train.zero_stage": 2})
    run("cae_v2", args)
    recs = records(tmp_path / "cae")
    check_loss_falls(recs)
    assert {"loss_cls", "loss_visible", "loss_masked"} <= set(recs[0])
    check_teacher_not_saved("cae_v2", args, tmp_path / "cae")


@pytest.mark.slow
def test_mr_mae_zero2_loss_falls(digits, tmp_path) -> None:
    args = overrides(digits, tmp_path, "mr", **{"train.zero_stage": 2})
    run("mr_mae", args)
    recs = records(tmp_path / "mr")
    check_loss_falls(recs)
    check_loss_falls(recs, "loss_mimic")
    check_teacher_not_saved("mr_mae", args, tmp_path / "mr")


@pytest.mark.slow
def test_mr_mae_zero3_with_offloaded_teacher_outside_the_engine(digits, tmp_path) -> None:
    args = overrides(digits, tmp_path, "mr3", **{"train.zero_stage": 3, "teacher.offload": True})
    run("mr_mae", args)
    check_loss_falls(records(tmp_path / "mr3"))
    check_teacher_not_saved("mr_mae", args, tmp_path / "mr3")
