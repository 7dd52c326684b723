"""Optimizer parameter groups, the lr schedule and the DeepSpeed JSON, built from a recipe."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mimscale.config import Derived, Recipe

# Parameter names (suffixes) that the fine-tune exclusion set ("ndim1_bias_tokens") keeps out of
# weight decay on top of ndim <= 1 params; MAE pre-training decays the 3-D tokens (docs/methods.md §6.8).
TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "dist_token", "reg_token")


def no_decay_names(model: nn.Module, rule: str) -> set[str]:
    """Names of trainable parameters that get no weight decay under ``rule``.

    Args:
        model: the method (only ``requires_grad`` parameters are considered).
        rule: ``ndim1_bias`` (MAE / timm ``add_weight_decay``: ndim <= 1 or ``.bias``) or
            ``ndim1_bias_tokens`` (additionally cls/pos/mask tokens, as MAE fine-tuning) or
            ``ndim1_bias_cls_pos`` (additionally cls/pos tokens only, as SimMIM pre-training).
    """
    out = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            out.add(name)
        elif rule == "ndim1_bias_tokens" and name.split(".")[-1] in TOKEN_NAMES:
            out.add(name)
        elif rule == "ndim1_bias_cls_pos" and name.split(".")[-1] in ("cls_token", "pos_embed"):
            out.add(name)  # SimMIM pre-training: its mask token stays decayed (docs/methods.md §6.8)
    return out


def param_groups(model: nn.Module, r: Recipe) -> list[dict[str, Any]]:
    """AdamW groups: weight-decay exclusion per the recipe, optional layer-wise lr decay.

    Both come from timm (``param_groups_weight_decay`` / ``param_groups_layer_decay``) with our
    exclusion set passed as exact names. Layer decay groups through the model's
    ``group_matcher`` (MAE ``util/lr_decay`` numbering: embeddings 0, block k -> k+1, the rest
    last, so decoders and heads get scale 1).
    Frozen parameters are in no group; every trainable parameter is in exactly one.
    Each group carries ``lr_scale`` (1.0 without layer decay).
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    o = r.optim
    skip = no_decay_names(model, o.wd_exclude)
    if o.layer_decay is not None:
        groups = param_groups_layer_decay(
            model, weight_decay=o.weight_decay, no_weight_decay_list=list(skip), layer_decay=o.layer_decay
        )
    else:
        groups = param_groups_weight_decay(
            model, weight_decay=o.weight_decay, no_weight_decay_list=list(skip)
        )
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return groups


def lr_factor(step: int, r: Recipe, d: Derived) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (per-iteration, as MAE lr_sched).

    Linear warmup from ``warmup_lr`` to the peak, then half-cycle cosine to ``min_lr``
    (or multistep decay at ``milestones`` epochs, as SimMIM; or constant).
    """
    o = r.optim
    if step < d.warmup_steps:
        start = o.warmup_lr / d.lr
        return start + (1.0 - start) * step / d.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "multistep":
        passed = sum(step >= m * d.steps_per_epoch for m in o.milestones)
        return o.gamma**passed
    floor = o.min_lr / d.lr
    span = max(1, d.total_steps - d.warmup_steps)
    progress = min(1.0, (step - d.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, r: Recipe, d: Derived, device: torch.device):
    """AdamW (or LARS) over :func:`param_groups` plus a LambdaLR of :func:`lr_factor`.

    DeepSpeed steps the scheduler after every optimizer step and saves/loads its state.
    """
    groups = param_groups(model, r)
    for g in groups:
        g["lr"] = d.lr * g["lr_scale"]
    if r.optim.optimizer == "lars":
        # MAE's LARS adapts (and decays) only the ndim > 1 weights (timm merges groups at wd 0).
        split = []
        for g in groups:
            for adapt in (True, False):
                ps = [p for p in g["params"] if (p.ndim > 1) == adapt]
                if ps:
                    split.append({**g, "params": ps, "always_adapt": adapt})
        opt: torch.optim.Optimizer = _skipping_lars()(split, lr=d.lr, momentum=0.9)
    else:
        b1, b2 = r.optim.betas
        # Fused on every device: it takes the loop's device-side non-finite flag (found_inf) and skips
        # a bad step without a host sync (engine/loop.py::train_step).
        opt = torch.optim.AdamW(groups, lr=d.lr, betas=(b1, b2), eps=r.optim.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, r, d))
    return opt, sched


def _skipping_lars() -> Any:
    """timm's LARS, skipping its step when the loop's non-finite flag ``found_inf`` is set, as the
    fused AdamW does on the device (here: one host read per step).

    The loop's earlier fallback (lr 0, gradients zeroed before ``engine.step``) let a NaN step
    through under ZeRO-1/2: DeepSpeed writes the flat fp32 gradients inside its own step, after
    the zeroing, and ``0 * NaN`` is NaN (tests/engine/test_autocast.py).
    """
    from timm.optim import Lars

    class SkippingLars(Lars):
        takes_found_inf = True

        def step(self, closure=None):
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None and bool(found_inf):
                return None
            return super().step(closure)

    return SkippingLars


def apply_recipe_lr(sched: torch.optim.lr_scheduler.LambdaLR, r: Recipe, d: Derived) -> tuple[float, float]:
    """After a checkpoint load, make this run's peak lr the one the schedule follows.

    DeepSpeed restores the scheduler's ``base_lrs`` and the groups' current ``lr`` from the
    checkpoint, so a resumed run would keep the saved run's peak lr while printing the
    recipe's. A researcher who changes ``optim.lr``/``blr`` on resume wants the new value: the
    base lrs become ``d.lr * lr_scale`` and the groups' lr is set for the restored step, so the
    very next optimizer step already uses it. The schedule's shape (warmup, cosine) is this
    run's ``lr_factor``, at the restored step.

    Returns:
        ``(peak lr saved in the checkpoint, peak lr now)``; equal when nothing changed.
    """
    opt = sched.optimizer
    scale0 = opt.param_groups[0].get("lr_scale", 1.0)
    before = sched.base_lrs[0] / scale0 if scale0 else d.lr
    factor = lr_factor(sched.last_epoch, r, d)
    sched.base_lrs = [d.lr * g.get("lr_scale", 1.0) for g in opt.param_groups]
    for g, base in zip(opt.param_groups, sched.base_lrs, strict=True):
        g["initial_lr"] = base
        g["lr"] = base * factor
    sched._last_lr = [g["lr"] for g in opt.param_groups]  # what get_last_lr() reports
    return before, d.lr


def use_bf16(r: Recipe, device: torch.device) -> bool:
    """bf16 parameters (DeepSpeed's ``bf16`` mode): ``train.precision`` bf16, or auto on CUDA."""
    if r.train.precision == "auto":
        return device.type == "cuda"
    return r.train.precision == "bf16"


def use_autocast(r: Recipe) -> bool:
    """``train.precision: autocast``: fp32 parameters, gradients and optimizer (the fp32 path's
    state and checkpoint layout), bf16 matmuls and convolutions under ``torch.autocast`` entered by
    DeepSpeed's engine forward. DeepSpeed's bf16 mode instead keeps bf16 parameters beside fp32
    master copies, and its optimizer casts, norms and copies every parameter tensor each step:
    on an H200 (ViT-L/16 MAE b256, ZeRO-0) that optimizer step alone took 142 ms, a whole
    autocast step 97 ms (issue 24)."""
    return r.train.precision == "autocast"


def use_compile(r: Recipe, device: torch.device) -> bool:
    """``train.compile``: auto compiles the blocks on CUDA only (on a CPU the compile time of a
    short run is not paid back, and inductor needs a C++ toolchain)."""
    if r.train.compile == "auto":
        return device.type == "cuda"
    return bool(r.train.compile)


# ZeRO-1/2 gradient bucket on a CPU, in elements: 4 MB of fp32. DeepSpeed allocates its flat
# reduction buffers afresh every step; glibc serves blocks over 32 MiB with mmap and unmaps them on
# free, so the default 5e8-element bucket page-faults a whole model's worth of gradients each step.
# Small buckets are reused from the heap and stay in cache between flatten, all-reduce and copy-back.
CPU_REDUCE_BUCKET = 1_000_000


def zero_section(stage: int, device: torch.device) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` settings for ``stage`` on ``device`` (no norm/clip keys).

    Measured on a CPU (ViT-S/16 MAE, one rank, one thread; the engine's extra time per step over
    the bare fused AdamW step): ZeRO-1 with DeepSpeed's defaults 248 ms, with these 97 ms; ZeRO-2
    247 ms -> 116 ms; at batch 8 engine/bare 1.09 -> 1.04 (ZeRO-1), 1.08 -> 1.04 (ZeRO-2). What
    remains is DeepSpeed's step itself: it flattens the gradients into a fresh fp32 partition every
    step (page-faulted anew on a CPU) and copies the updated master weights back.
    ZeRO-1 keeps every gradient whole, so ``contiguous_gradients`` (a copy into
    a staging bucket, then another into a partition buffer, against fragmentation of partitioned
    gradients) only adds two copies; on a CPU the same holds at ZeRO-2, where the host allocator
    does not fragment. GPU buckets keep DeepSpeed's default size (fewer, larger NCCL calls; the
    caching allocator reuses them).
    """
    zero: dict[str, Any] = {"stage": stage}
    if stage == 1 or (stage == 2 and device.type == "cpu"):
        zero["contiguous_gradients"] = False
    if stage in (1, 2) and device.type == "cpu":
        zero["reduce_bucket_size"] = CPU_REDUCE_BUCKET
    return zero


def deepspeed_config(r: Recipe, d: Derived, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON, from a few named recipe settings (EVA-02 style).

    Two DeepSpeed checks are switched off because they cost a Python loop over every parameter
    each step (on a GPU the step becomes CPU-bound: measured 2.6x slower than the bare step for
    ViT-L MAE at 128 images): the bf16 per-gradient inf/nan scan (the loop already skips steps
    whose loss is non-finite, agreed across ranks) and, without clipping, the global grad norm.
    The ZeRO buckets follow :func:`zero_section`.
    """
    t = r.train
    bf16 = use_bf16(r, device)
    clip = r.optim.clip_grad or 0.0
    zero = zero_section(t.zero_stage, device)
    if t.zero_stage == 3:
        # Keep every parameter partitioned (small tiny-model params too) so tests exercise ZeRO-3.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=1e9)
    # DeepSpeed routes bf16 + ZeRO-1 to its BF16 optimizer, which always computes the norm.
    if clip == 0.0 and (t.zero_stage == 2 or (t.zero_stage == 1 and not bf16)):
        zero["compute_grad_norm"] = False
    out: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if use_autocast(r):
        # DeepSpeed wraps its forward in torch.autocast and reduces the gradients of Linear/Conv
        # weights in bf16 (its lower_precision_safe_modules default), as the bf16 mode does.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return out
