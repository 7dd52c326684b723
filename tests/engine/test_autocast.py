"""``train.precision: autocast`` is DeepSpeed's own ``torch_autocast`` mode: fp32 parameters and
optimizer, bf16 matmuls inside the engine's forward, at every ZeRO stage, with the device-side skip
of non-finite steps, LARS, a frozen teacher in its own dtype, exact resume, the universal
conversion (another world size) and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, python, run_cmd

from mimscale.engine.optim import deepspeed_config, use_autocast, use_bf16

TINY = REPO / "recipes/mae/cpu_tiny.yaml"
CPU = torch.device("cpu")


def _recipe(path: Path = TINY, *extra: str):
    from mimscale.registry import load_recipe

    base = ["train.precision=autocast", "train.global_batch=8", "train.micro_batch=8"]
    return load_recipe(path, [*base, *extra])


def test_autocast_is_deepspeeds_torch_autocast_section() -> None:
    from mimscale.config import derive

    r = _recipe()
    cfg = deepspeed_config(r, derive(r, 1, 800), CPU)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert cfg["bf16"]["enabled"] is False  # fp32 parameters: not DeepSpeed's bf16 optimizer
    assert use_autocast(r) and not use_bf16(r, torch.device("cuda"))
    plain = _recipe(TINY, "train.precision=bf16")
    assert "torch_autocast" not in deepspeed_config(plain, derive(plain, 1, 800), CPU)


@pytest.mark.parametrize(
    ("stage", "optimizer", "precision"),
    [
        (0, "adamw", "autocast"),
        (1, "adamw", "autocast"),
        (2, "adamw", "autocast"),
        (3, "adamw", "autocast"),
        (1, "lars", "autocast"),
        (1, "lars", "fp32"),  # LARS under ZeRO-1 once let a NaN step through at any precision
    ],
)
def test_engine_runs_bf16_matmuls_on_fp32_parameters_and_skips_bad_steps(
    stage: int, optimizer: str, precision: str
) -> None:
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, seed_everything, train_step
    from mimscale.methods import build_method

    over = [f"train.zero_stage={stage}", f"optim.optimizer={optimizer}", f"train.precision={precision}"]
    r = _recipe(TINY, *over)
    dist = init_distributed()
    seed_everything(0)
    engine = build_engine(build_method(r), r, derive(r, 1, 800), dist.device)
    assert engine.torch_autocast_enabled() == (precision == "autocast") and not engine.bfloat16_enabled()
    seen: set[torch.dtype] = set()
    for m in engine.module.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, o: seen.add(o.dtype))
    batch = synthetic_batch(r)

    def step(bad: bool) -> float:
        before = [p.detach().clone() for p in engine.module.parameters()]
        b = dict(batch)
        if bad:  # a non-finite pixel makes the loss NaN: the step must leave every weight as it was
            b["views"] = [v.float() * float("nan") for v in batch["views"]]
        outs, flag = train_step(engine, [b], dist.device, torch.float32)
        assert bool(flag) == bad and outs[0].loss.dtype == torch.float32
        after = engine.module.parameters()
        return max((p.detach() - q).abs().max().item() for p, q in zip(after, before, strict=True))

    if stage == 3:  # partitioned parameters: compare what the step changes through the loss instead
        outs, flag = train_step(engine, [batch], dist.device, torch.float32)
        assert not bool(flag) and torch.isfinite(outs[0].loss)
    else:
        assert step(True) == 0.0  # first: warmup starts at lr 0, so a good first step moves nothing
        assert step(False) > 0.0
    # every Linear ran in bf16 under DeepSpeed's autocast (fp32 without it)
    assert seen == {torch.bfloat16 if precision == "autocast" else torch.float32}
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}


def test_teacher_keeps_its_own_dtype_outside_the_students_autocast() -> None:
    """CAE v2's frozen CLIP teacher runs outside the engine's forward (DeepSpeed #3175): autocast
    does not reach it, its targets come in the teacher's dtype, and it gets no gradient."""
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, seed_everything, train_step
    from mimscale.engine.setup import build_target_provider, prepare_batch
    from mimscale.methods import build_method

    r = _recipe(REPO / "recipes/cae_v2/cpu_tiny.yaml")
    dist = init_distributed()
    seed_everything(0)
    engine = build_engine(build_method(r), r, derive(r, 1, 800), dist.device)
    provider = build_target_provider(r, dist.device)
    batch = synthetic_batch(r)
    targets = provider(prepare_batch(batch, dist.device, torch.float32))
    assert targets.tokens.dtype == provider.dtype == torch.float32  # teacher.dtype auto on a CPU
    outs, bad = train_step(engine, [batch], dist.device, torch.float32, provider)
    assert not bool(bad) and torch.isfinite(outs[0].loss)
    assert all(p.grad is None for p in provider.model.parameters())


def _args(digits: dict, out: Path, name: str, steps: int) -> list[str]:
    kw = {
        "data.train": digits["train"], "data.val": digits["val"], "run.out_dir": str(out),
        "run.name": name, "train.zero_stage": 2, "train.precision": "autocast",
        "train.max_steps": steps, "train.global_batch": 64, "train.micro_batch": 32,
        "train.log_every": 1, "train.ckpt_every": 1000, "data.num_workers": 1,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in kw.items()]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_autocast_resume_is_exact_converts_to_two_ranks_and_exports(digits, tmp_path: Path) -> None:
    from mimscale.eval.ckpt import method_state_dict
    from mimscale.eval.export import export_encoder, load_exported

    train = [python(), "-m", "mimscale.train", str(TINY)]
    run_cmd([*train, *_args(digits, tmp_path, "full", 4)])
    run_cmd([*train, *_args(digits, tmp_path, "part", 2)])
    shutil.copytree(tmp_path / "part", tmp_path / "wide")  # the same step-2 checkpoint, for 2 ranks
    out = run_cmd([*train, *_args(digits, tmp_path, "part", 4)])
    assert "resumed from" in out.stdout + out.stderr
    full, part = method_state_dict(tmp_path / "full"), method_state_dict(tmp_path / "part")
    assert all(v.dtype == torch.float32 for v in full.values())  # fp32 parameters throughout
    assert max((full[k] - part[k]).abs().max().item() for k in full) == 0.0
    assert _losses(tmp_path / "full")[2:] == _losses(tmp_path / "part")[2:]
    # ZeRO-2 saved on one rank, resumed on two: DeepSpeed's universal conversion
    exe = shutil.which("deepspeed") or "deepspeed"
    wide = [exe, "--num_gpus=2", f"--master_port={free_port()}", "--module", "mimscale.train", str(TINY)]
    out = run_cmd([*wide, *_args(digits, tmp_path, "wide", 3)])
    assert "world size 1 -> 2" in out.stdout and "resumed from" in out.stdout + out.stderr
    assert all(x == x for x in _losses(tmp_path / "wide"))
    # export of the autocast checkpoint: the fp32 encoder, loaded strictly by timm, same features
    from mimscale.methods import build_method

    export_encoder(tmp_path / "part", tmp_path / "enc.safetensors")
    model = load_exported(tmp_path / "enc.safetensors", pretrained_overlay=False).eval()
    method = build_method(_recipe())
    method.load_state_dict(part)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.forward_features(x), method.eval().encoder(x).x)
