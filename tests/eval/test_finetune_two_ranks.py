"""A 2-rank fine-tune through the real `deepspeed` launcher (gloo on CPU) with ZeRO-3: the loss falls,
the eval hook (features split across ranks) logs kNN / probe / top-1, and the ZeRO-3 checkpoint is
consolidated for `mimscale eval` and `mimscale export` (timm features equal the checkpoint's)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch import REPO, free_port, run_cmd

RECIPE = str(REPO / "recipes/finetune/cpu_tiny.yaml")


@pytest.mark.slow
def test_two_rank_zero3_finetune_eval_export(digits, tmp_path) -> None:
    kw = {
        "data.train": digits["train"], "data.val": digits["val"], "run.out_dir": str(tmp_path),
        "run.name": "ft", "train.zero_stage": 3, "train.global_batch": 64, "train.micro_batch": 32,
        "train.max_steps": 12,
        "train.log_every": 1, "data.num_workers": 1, "optim.blr": 4.0e-3, "optim.warmup_epochs": 0,
        "model.drop_path": 0.0, "eval.every": 6, "eval.knn": True, "eval.linear": True,
        "eval.linear_iters": 30,
    }  # fmt: skip
    exe = shutil.which("deepspeed") or "deepspeed"
    run_cmd([exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train", RECIPE,
             *[f"{k}={v}" for k, v in kw.items()]])  # fmt: skip
    run = tmp_path / "ft"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    evals = [r for r in recs if "eval/top1" in r]
    assert [r["step"] for r in evals] == [6, 12] and all(r["samples"] == 64 * r["step"] for r in evals)
    last = evals[-1]
    assert last["eval/num_train"] == digits["num_train"] and last["eval/num_val"] == digits["num_val"]
    assert all(0.0 <= last[f"eval/{k}"] <= 100.0 for k in ("top1", "knn_top1", "linear_top1"))

    # Standalone evaluation of the ZeRO-3 checkpoint (consolidated by DeepSpeed's zero_to_fp32)
    # reproduces the hook's top-1, computed from the gathered parameters during training.
    from mimscale.eval.standalone import run_eval

    res = run_eval(run, out=tmp_path / "ev", knn=False, linear=False)
    assert res["top1"] == pytest.approx(last["eval/top1"], abs=1e-4)
    assert json.loads((tmp_path / "ev/eval.json").read_text())["top1"] == res["top1"]

    from mimscale.eval.export import export_encoder, load_exported
    from mimscale.eval.runs import load_method

    export_encoder(run, tmp_path / "ft.safetensors")
    method, r = load_method(run)
    x = torch.randn(2, 3, r.model.img_size, r.model.img_size)
    assert torch.allclose(load_exported(tmp_path / "ft.safetensors").eval().forward_features(x),
                          method.encoder(x).x, atol=1e-6)  # fmt: skip
