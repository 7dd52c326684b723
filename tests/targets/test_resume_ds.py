"""Training from a precomputed bank under the real `deepspeed` launcher, 2 CPU ranks, ZeRO-2:
a run killed after 3 steps and resumed reaches the uninterrupted run's weights bitwise, with the
same samples and losses, across an epoch boundary (where the K = 2 stored views are re-picked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, run_cmd

N = 3  # 128 images / (2 ranks x 16) = 4 steps per epoch: 2N steps cross into epoch 1


def args(train: str, bank: str, out: Path, name: str, steps: int) -> list[str]:
    kw = {
        "data.train": train, "run.out_dir": str(out), "run.name": name, "train.log_every": 1,
        "train.ckpt_every": 1000, "train.log_keys": True, "train.global_batch": 32, "train.micro_batch": 16,
        "data.num_workers": 1, "train.zero_stage": 2, "train.max_steps": steps, "optim.warmup_epochs": 0,
        "teacher.source": "precomputed", "teacher.bank": bank,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in kw.items()]


def train(a: list[str]):
    exe = shutil.which("deepspeed") or "deepspeed"
    recipe = str(REPO / "recipes/cae_v2/cpu_tiny.yaml")
    return run_cmd(
        [exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train", recipe, *a]
    )


def losses(d: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]


def weights(d: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (d / "checkpoints" / "LATEST").read_text().strip()
    return get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints"), tag=tag)


@pytest.mark.slow
def test_precomputed_teacher_resume_is_exact_two_ranks_zero2(small_digits, bank_factory, tmp_path) -> None:
    bank = bank_factory("cae_v2", "fp16")
    train(args(small_digits, bank, tmp_path, "full", 2 * N))
    train(args(small_digits, bank, tmp_path, "part", N))
    out = train(args(small_digits, bank, tmp_path, "part", 2 * N))
    assert "resumed from" in out.stdout + out.stderr
    full, part = tmp_path / "full", tmp_path / "part"
    for rank in (0, 1):
        assert (full / f"keys_rank{rank}.txt").read_text() == (part / f"keys_rank{rank}.txt").read_text()
    assert losses(full)[N:] == losses(part)[N:] and all(v == v for v in losses(full))
    wf, wp = weights(full), weights(part)
    assert wf.keys() == wp.keys()
    assert max((wf[k] - wp[k]).abs().max().item() for k in wf) == 0.0
    meta = json.loads((full / "meta.json").read_text())["teacher"]
    assert meta["source"] == "precomputed" and meta["encoding"] == "fp16" and meta["views_per_image"] == 2
