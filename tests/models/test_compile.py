"""Regional ``torch.compile`` of the blocks (``train.compile``) trains like eager on a CPU, and a
compiled run resumes bitwise from a state dict (compiling keeps every key)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from launch import REPO

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor needs a C++ compiler on a CPU (none on PATH)",
)


def _setup():
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.setup import prepare_batch, seed_everything
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    r = load_recipe(RECIPE, ["train.global_batch=4", "train.micro_batch=4", "model.drop_path=0.0"])
    seed_everything(0)
    method = build_method(r)
    batches = []
    for i in range(4):
        torch.manual_seed(i)
        b = prepare_batch(synthetic_batch(r), torch.device("cpu"), torch.float32)
        batches.append(b)
    return method, batches


def _train(method, batches, opt=None):
    opt = opt or torch.optim.AdamW(method.parameters(), lr=1e-3, fused=True)
    losses = []
    for b in batches:
        torch.manual_seed(123)  # the same masking / dropout draws in both runs
        loss = method(b, b.get("mask"), None).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def test_compiled_blocks_match_eager_and_resume_exactly() -> None:
    from mimscale.models.vit import compile_blocks

    torch._dynamo.reset()
    eager, batches = _setup()
    compiled = copy.deepcopy(eager)
    keys = list(eager.state_dict())
    assert compile_blocks(compiled) > 0
    assert list(compiled.state_dict()) == keys  # checkpoints stay interchangeable
    for m in (eager, compiled):  # one step's gradients first
        torch.manual_seed(123)
        m(batches[0], batches[0].get("mask"), None).loss.backward()
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert (a.grad - b.grad).abs().max().item() <= 1e-6, n
        a.grad = b.grad = None
    # SGD for the weights: AdamW normalises each update to ~lr, so the rounding noise of an
    # exactly-zero gradient (the key bias: softmax ignores it) would become an lr-sized step.
    le, _ = _train(eager, batches, torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9))
    lc, _ = _train(compiled, batches, torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9))
    assert max(abs(a - b) for a, b in zip(le, lc, strict=True)) <= 1e-6, (le, lc)
    for (n, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        assert (a - b).abs().max().item() <= 1e-6, n
    # exact resume with compile on: 2 steps, state dicts to a fresh compiled copy, 2 more steps
    start, _ = _setup()
    full = copy.deepcopy(start)
    compile_blocks(full)
    _train(full, batches)
    part = copy.deepcopy(start)
    compile_blocks(part)
    _, opt = _train(part, batches[:2])
    sd, osd = copy.deepcopy(part.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(start)
    compile_blocks(resumed)
    resumed.load_state_dict(sd)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-3, fused=True)
    opt2.load_state_dict(osd)
    _train(resumed, batches[2:], opt2)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_compiled_blocks_train_through_deepspeed_with_checkpointing() -> None:
    """``train.compile=on`` through ``build_engine`` (ZeRO-2, activation checkpointing): the
    same losses as the eager engine over a few steps."""
    from mimscale.config import derive
    from mimscale.data.synthetic import synthetic_batch
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import build_engine, train_step
    from mimscale.engine.setup import seed_everything
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    dist = init_distributed()
    losses = {}
    for mode in ("off", "on"):
        torch._dynamo.reset()
        r = load_recipe(
            RECIPE,
            ["train.global_batch=4", "train.micro_batch=4", "train.zero_stage=2", "model.drop_path=0.0",
             "train.activation_checkpointing=true", f"train.compile={mode}"],
        )  # fmt: skip
        seed_everything(0)
        method = build_method(r)
        method.set_grad_checkpointing(True)
        engine = build_engine(method, r, derive(r, 1, 400), dist.device)
        compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in engine.module.modules())
        assert compiled == (mode == "on")
        out = []
        for i in range(3):
            torch.manual_seed(123)
            outs, bad = train_step(engine, [synthetic_batch(r, seed=i)], dist.device, torch.float32)
            out.append(outs[0].loss.item())
            assert bad.item() == 0.0
        losses[mode] = out
    assert max(abs(a - b) for a, b in zip(losses["off"], losses["on"], strict=True)) <= 1e-6, losses
