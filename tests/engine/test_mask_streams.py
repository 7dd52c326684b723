"""Checkpoints record the mask random-stream version; a run whose method draws device-side masks
from the batch noise refuses a checkpoint of another version with one line (exit 2)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from launch import REPO, python, run_cmd

from mimscale.engine.bookkeeping import ResumeRefusedError, check_mask_streams
from mimscale.masking import MASK_STREAMS
from mimscale.methods import build_method
from mimscale.registry import load_recipe


def _method(name: str, *overrides: str):
    return build_method(load_recipe(REPO / f"recipes/{name}/cpu_tiny.yaml", list(overrides)))


@pytest.mark.parametrize(
    ("name", "overrides", "draws"),
    [
        ("lc_mae", [], True),
        ("lc_mae", ["lc_mae.cross_view=false"], False),
        ("mr_mae", [], True),  # focused: sample
        ("mr_mae", ["mr_mae.focused=topk"], False),
        ("mae", [], False),
    ],
)
def test_only_methods_drawing_from_the_noise_refuse_old_checkpoints(
    name: str, overrides: list[str], draws: bool
) -> None:
    method = _method(name, *overrides)
    assert method.uses_mask_noise is draws
    check_mask_streams({"mask_streams": MASK_STREAMS}, Path("ckpt"), method)  # this version: fine
    if draws:
        with pytest.raises(ResumeRefusedError, match=r"cannot resume ckpt: .* mask random streams v1"):
            check_mask_streams({}, Path("ckpt"), method)  # saved before the version was recorded
    else:
        check_mask_streams({}, Path("ckpt"), method)  # its masks did not change: it resumes


@pytest.mark.slow
def test_train_refuses_an_lc_mae_checkpoint_of_the_old_streams(digits, tmp_path: Path) -> None:
    common = [
        str(REPO / "recipes/lc_mae/cpu_tiny.yaml"),
        f"data.train={digits['train']}",
        f"run.out_dir={tmp_path}",
        "run.name=old",
        "train.global_batch=16",
        "train.micro_batch=16",
        "data.num_workers=0",
        "eval.every=0",
    ]
    run_cmd([python(), "-m", "mimscale.train", *common, "train.max_steps=1"])
    states = list((tmp_path / "old/checkpoints").glob("*/mp_rank_00_model_states.pt"))
    assert len(states) == 1
    state = torch.load(states[0], weights_only=True)
    assert state["mask_streams"] == MASK_STREAMS  # recorded with the client state
    del state["mask_streams"]  # as a checkpoint written before the change
    torch.save(state, states[0])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(
        [python(), "-m", "mimscale.train", *common, "train.max_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "mask random streams v1" in errors[0] and "run.resume=never" in errors[0]
    assert "Traceback" not in out.stderr
