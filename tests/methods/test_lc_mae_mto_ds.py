"""LC-MAE and MAE+MTO under the real `deepspeed` launcher: 2 CPU processes (gloo), ZeRO-2, real digits
shards. The loss falls; LC-MAE's momentum update equals the formula; its momentum state survives an
exact resume (the resumed run restarts from a copy of the uninterrupted run's mid-way checkpoint, so
two launches give both the reference and the resumed run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, run_cmd

EMA_KEY = "momentum_model._extra_state"


def overrides(digits: dict, out: Path, name: str, **kw) -> list[str]:
    base = {
        "data.train": digits["train"], "data.val": digits["val"], "run.out_dir": str(out), "run.name": name,
        "run.deterministic": True, "train.log_every": 1, "train.log_keys": True, "train.zero_stage": 2,
        "train.global_batch": 32, "train.micro_batch": 16, "data.num_workers": 1,
        "optim.warmup_epochs": 0.1,  # a few steps of warmup, so that 8 steps show learning
    }  # fmt: skip
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def deepspeed(recipe: str, args: list[str]) -> str:
    exe = shutil.which("deepspeed") or "deepspeed"
    cmd = [exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train", recipe, *args]
    out = run_cmd(cmd, timeout=300)
    return out.stdout + out.stderr


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_states(run_dir: Path, step: int) -> dict:
    """The module state DeepSpeed saved (ZeRO-2: whole parameters, buffers, extra states)."""
    path = run_dir / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def fp32_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=(ckpt / "LATEST").read_text().strip())


def falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.slow
def test_lc_mae_zero2_momentum_formula_and_exact_resume(digits, tmp_path) -> None:
    recipe, n = str(REPO / "recipes/lc_mae/cpu_tiny.yaml"), 4
    # Reference run: 2n steps, a checkpoint after every step, the last n + 2 kept.
    out = deepspeed(
        recipe,
        overrides(
            digits,
            tmp_path,
            "full",
            **{"train.max_steps": 2 * n, "train.ckpt_every": 1, "train.keep_last": n + 2},
        ),
    )
    assert "per-rank BatchNorm" in out  # SyncBatchNorm refuses CPU tensors: the fallback is announced
    full = tmp_path / "full"
    recs = records(full)
    assert [r["step"] for r in recs] == list(range(1, 2 * n + 1))
    assert falls([r["loss"] for r in recs]), recs

    # The momentum update after step 2n, from the saved states of steps 2n - 1 and 2n:
    # xi_2n = tau * xi_(2n-1) + (1 - tau) * theta_2n over parameters and float buffers, tau = the
    # schedule value the method logged for that step (tau(2n - 1) of the cosine 0.996 -> 1).
    prev, last = model_states(full, 2 * n - 1), model_states(full, 2 * n)
    tau = recs[-1]["momentum"]
    assert 0.996 <= tau < 1.0
    xi0, xi1 = prev[EMA_KEY]["state"], last[EMA_KEY]["state"]
    assert last[EMA_KEY]["num_updates"] == 2 * n
    assert any(k.startswith("projector.") and "running_mean" in k for k in xi1)  # buffers too
    for k, v in xi1.items():
        if v.is_floating_point():
            expect = tau * xi0[k].double() + (1 - tau) * last[k].double()
            assert torch.allclose(v.double(), expect, atol=2e-7), k
            assert v.dtype == torch.float32

    # Resume: a new run starts from a copy of step n of the reference and trains to 2n.
    ckpt = tmp_path / "part" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / f"step{n:08d}", ckpt / f"step{n:08d}")
    (ckpt / "LATEST").write_text(f"step{n:08d}\n")
    out = deepspeed(
        recipe, overrides(digits, tmp_path, "part", **{"train.max_steps": 2 * n, "train.ckpt_every": 1000})
    )
    assert "resumed from" in out
    part = tmp_path / "part"
    assert [r["loss"] for r in records(part)] == [r["loss"] for r in recs[n:]]
    for rank in (0, 1):  # the same samples, in the same order, on every rank
        ref = (full / f"keys_rank{rank}.txt").read_text().splitlines()[n:]
        assert (part / f"keys_rank{rank}.txt").read_text().splitlines() == ref
    wf, wp = fp32_weights(full), fp32_weights(part)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)
    ema_f, ema_p = last[EMA_KEY], model_states(part, 2 * n)[EMA_KEY]
    assert ema_f["num_updates"] == ema_p["num_updates"]
    assert all(torch.equal(ema_f["state"][k], ema_p["state"][k]) for k in ema_f["state"])


@pytest.mark.slow
def test_mae_with_mto_two_ranks_loss_falls(digits, tmp_path) -> None:
    recipe = str(REPO / "recipes/mto/mae_cpu_tiny.yaml")
    deepspeed(recipe, overrides(digits, tmp_path, "mto", **{"train.max_steps": 8, "train.ckpt_every": 1000}))
    recs = records(tmp_path / "mto")
    assert len(recs) == 8 and falls([r["loss"] for r in recs]), recs
    depth = 2  # recipes/mae/cpu_tiny.yaml: decoder_depth 2 -> H^0..H^2 logged every step
    for r in recs:
        assert {f"mto_h{i}" for i in range(depth + 1)} | {"loss_spa", "loss_e", "loss_rank"} <= set(r)
