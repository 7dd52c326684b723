"""A changed optim.lr / blr on resume is applied (and said), not silently replaced by the
checkpoint's scheduler state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import REPO, python, run_cmd

from mimscale.config import Derived, derive
from mimscale.engine.optim import apply_recipe_lr, build_optimizer, lr_factor
from mimscale.registry import load_recipe, recipe_from_dict

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")


def _recipe(lr: float):
    return recipe_from_dict(
        {
            "optim": {"lr": lr, "warmup_epochs": 1},
            "train": {"epochs": 3, "global_batch": 10, "micro_batch": 10},
        }
    )


def test_scheduler_follows_new_lr_after_state_load() -> None:
    """The scheduler state of a run at lr 1.0, loaded into a run at lr 3.0: the groups' lr at the
    restored step and every later step follow 3.0."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    old_r = _recipe(1.0)
    d_old = derive(old_r, world_size=1, samples_per_epoch=100)
    opt, sched = build_optimizer(model, old_r, d_old, torch.device("cpu"))
    for _ in range(7):
        opt.step(), sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    r = _recipe(3.0)
    d = derive(r, world_size=1, samples_per_epoch=100)
    opt, sched = build_optimizer(model, r, d, torch.device("cpu"))
    opt.load_state_dict(saved_opt), sched.load_state_dict(saved_sched)  # what DeepSpeed does
    assert opt.param_groups[0]["lr"] == 1.0 * opt.param_groups[0]["lr_scale"] * lr_factor(7, r, d_old)
    assert apply_recipe_lr(sched, r, d) == (1.0, 3.0)
    for step in range(7, 16):  # through the end of warmup (step 10) into the cosine
        for g in opt.param_groups:
            assert abs(g["lr"] - 3.0 * g["lr_scale"] * lr_factor(step, r, d)) < 1e-12
        opt.step(), sched.step()


@pytest.mark.slow
def test_resume_with_changed_blr_applies_it(digits, tmp_path: Path) -> None:
    common = [
        f"data.train={digits['train']}",
        f"data.val={digits['val']}",
        f"run.out_dir={tmp_path}",
        "run.name=lr",
        "train.global_batch=64",
        "train.micro_batch=64",
        "train.log_every=1",
        "data.num_workers=1",
    ]
    run_cmd([python(), "-m", "mimscale.train", RECIPE, *common, "train.max_steps=2", "optim.blr=1.5e-3"])
    out = run_cmd([python(), "-m", "mimscale.train", RECIPE, *common, "train.max_steps=4", "optim.blr=3e-3"])
    assert (
        "optim lr changed since the checkpoint: peak 0.000375 -> 0.00075, applied from step 2" in out.stdout
    )
    run = tmp_path / "lr"
    r = load_recipe(run / "recipe.yaml")
    d = Derived(**json.loads((run / "meta.json").read_text())["derived"])
    assert d.lr == 3e-3 * 64 / 256
    recs = {x["step"]: x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (3, 4):  # the lr after each optimizer step (the scheduler has stepped `step` times)
        assert abs(recs[step]["lr"] - d.lr * lr_factor(step, r, d)) < 1e-12, recs[step]
