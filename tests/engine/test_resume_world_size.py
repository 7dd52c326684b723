"""Resume on another number of ranks (2 -> 1, 1 -> 2, ZeRO-2, CPU): the ZeRO checkpoint goes
through DeepSpeed's universal format and the weights come back exactly. The data position: in
``resampled`` mode the next epoch starts on the new layout (the rest of the interrupted one is
skipped); in ``exact`` mode the interrupted epoch's unread samples are re-split over the new
layout, so the key logs hold every sample of that epoch exactly once."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from launch import REPO, free_port, python, run_cmd

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")

# Build the trainer (it resumes), compare its weights with the checkpoint's consolidated fp32
# weights, report the step and data position, then train on to max_steps.
CHECK = r"""
import json, sys
import torch
from mimscale.registry import load_recipe
from mimscale.engine.loop import Trainer
from mimscale.eval.ckpt import method_state_dict
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
ref = method_state_dict(argv[0])
t = Trainer(load_recipe(argv[1], argv[2:]))
sd = t.engine.module.state_dict()
worst = max((sd[k].float() - ref[k]).abs().max().item() for k in ref)
pos = t.loader.state_dict()
if t.dist.rank == 0:
    print("CHECK " + json.dumps({"worst": worst, "step": t.state.step, "samples": t.state.samples,
                                 "epoch": pos["epoch"], "batches": pos["batches"]}), flush=True)
t.fit()
"""


def _args(digits: dict, out: Path, steps: int) -> list[str]:
    kw = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(out),
        "run.name": "w",
        "train.zero_stage": 2,
        "train.max_steps": steps,
        "train.global_batch": 64,
        "train.micro_batch": 32,
        "train.log_every": 1,
        "data.num_workers": 1,
    }
    return [f"{k}={v}" for k, v in kw.items()]


def _launch(nproc: int, module_or_script: list[str]) -> list[str]:
    if nproc == 1:
        return [python(), *module_or_script]
    exe = shutil.which("deepspeed") or "deepspeed"
    return [exe, f"--num_gpus={nproc}", f"--master_port={free_port()}", *module_or_script]


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(digits, tmp_path: Path, before: int, after: int) -> None:
    first = ["--module", "mimscale.train"] if before > 1 else ["-m", "mimscale.train"]
    run_cmd(_launch(before, [*first, RECIPE, *_args(digits, tmp_path, 2)]))
    tag = tmp_path / "w" / "checkpoints" / "step00000002"
    saved = shutil.copytree(tag, tmp_path / "saved" / "step00000002")  # the resume may prune it
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    out = run_cmd(_launch(after, [str(script), str(saved), RECIPE, *_args(digits, tmp_path, 4)]))
    check = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("CHECK "))[6:])
    assert check["worst"] == 0.0, check  # every weight as saved, whatever the new partitioning
    assert check["step"] == 2 and check["samples"] == 128
    # 2 steps of 64 were read on the old layout (micro-batches of 32 per rank): the rest of
    # epoch 0 is skipped (resampled mode, the recipe's: no exact epoch to re-split)
    assert (check["epoch"], check["batches"]) == (1, 0), check
    assert (
        f"world size {before} -> {after}: epoch 0 was {4 // before}/{1408 // 32 // before} batches"
        in out.stdout
    )
    assert "resampled has no exact epoch to re-split" in out.stdout
    assert "(never repeated), epoch 1 starts on the new layout" in out.stdout
    recs = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs][-2:] == [3, 4] and all(r["loss"] == r["loss"] for r in recs)
    ckpt = tmp_path / "w" / "checkpoints"
    assert (ckpt / "LATEST").read_text().strip() == "step00000004"
    assert not (ckpt / "universal").exists()  # the converted copy is removed once loaded
    assert len(list((ckpt / "step00000004").glob("*optim_states.pt"))) == after


def _keys(run: Path, rank: int) -> list[list[str]]:
    """The key log of a rank: one list of keys per step."""
    return [line.split() for line in (run / f"keys_rank{rank}.txt").read_text().splitlines()]


@pytest.mark.slow
def test_exact_epoch_is_resplit_when_two_ranks_resume_on_one(digits, tmp_path: Path) -> None:
    """2 ranks read 10 of epoch 0's 23 batches each, 1 rank reads the rest: every sample of the
    epoch is in the key logs exactly once, then epoch 1 follows."""
    args = [
        *_args(digits, tmp_path, 10),
        "data.epoch_mode=exact",
        "train.zero_stage=0",
        "train.log_keys=true",
        "train.ckpt_every=1000",
    ]
    run_cmd(_launch(2, ["--module", "mimscale.train", RECIPE, *args]))
    out = run_cmd(_launch(1, ["-m", "mimscale.train", RECIPE, *args, "train.max_steps=24"]))
    said = re.search(
        r"world size 2 -> 1: epoch 0 was 10/23 batches in; its (\d+) unread samples are re-split over "
        r"the new layout \((\d+) batches per rank\), then epoch 1 starts",
        out.stdout,
    )
    assert said, out.stdout[-3000:]
    left, batches = int(said[1]), int(said[2])
    assert left == 1438 - 2 * 10 * 32 and batches == -(-left // 32)  # 798 samples, 25 batches
    run = tmp_path / "w"
    before = [k for rank in (0, 1) for step in _keys(run, rank)[:10] for k in step]
    after = [k for step in _keys(run, 0)[10:] for k in step]  # 2 micro-batches of 32 per step
    assert len(_keys(run, 1)) == 10 and len(after) == 14 * 64  # steps 11..24 on one rank
    rest = after[: batches * 32][:left]  # the remainder's padding rows come last (one worker)
    every = set()
    for shard in Path(digits["train"]).parent.glob("*.tar"):
        with tarfile.open(shard) as tf:
            every |= {m.name.split(".")[0] for m in tf.getmembers()}
    assert len(every) == 1438 and sorted(before + rest) == sorted(every)  # each sample exactly once
    assert set(after[batches * 32 :]) <= every  # epoch 1 began within step 23, from its batch 0
