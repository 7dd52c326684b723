"""The fine-tune / linear-probe method: augmentations, frozen encoder, LARS groups, recipe checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimscale.config import RecipeError, derive
from mimscale.data.synthetic import synthetic_batch
from mimscale.engine.loop import prepare_batch
from mimscale.engine.optim import build_optimizer
from mimscale.methods import build_method
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes/finetune/cpu_tiny.yaml"


def batch_for(r, labels: bool = True):
    b = synthetic_batch(r)
    if labels:
        b["labels"] = torch.arange(len(b["labels"])) % r.method_cfg.num_classes
    return prepare_batch(b, torch.device("cpu"), torch.float32)


def test_full_augmentation_path_trains() -> None:
    """RandAugment + RandomErasing + mixup/cutmix + smoothing (timm) give a finite loss and grads."""
    r = load_recipe(
        TINY,
        [
            "train.micro_batch=8",
            "train.global_batch=8",
            "finetune.randaug=rand-m9-mstd0.5-inc1",
            "finetune.reprob=0.25",
            "finetune.mixup=0.8",
            "finetune.cutmix=1.0",
        ],
    )
    torch.manual_seed(0)
    m = build_method(r).train()
    out = m(batch_for(r), None)
    assert torch.isfinite(out.loss) and out.metrics["labeled"] == 1.0
    out.loss.backward()
    assert m.head.weight.grad is not None and m.encoder.vit.blocks[0].attn.qkv.weight.grad is not None
    assert (
        m.encoder.vit.norm.weight.grad is None and not m.encoder.vit.norm.weight.requires_grad
    )  # MAE: fc_norm
    assert m.predict(batch_for(r)["images"][0]).shape == (8, 10)


def test_unlabeled_samples_get_no_loss() -> None:
    r = load_recipe(TINY, ["train.micro_batch=4", "train.global_batch=4"])
    m = build_method(r).train()
    out = m(batch_for(r, labels=False), None)
    assert out.loss.item() == 0.0 and out.metrics["labeled"] == 0.0


def test_linprobe_freezes_encoder_and_uses_lars() -> None:
    r = load_recipe(
        TINY,
        [
            "finetune.mode=linprobe",
            "finetune.pool=cls",
            "finetune.head_init_std=0.01",
            "finetune.label_smoothing=0.0",
            "optim.optimizer=lars",
            "optim.blr=0.1",
            "optim.weight_decay=0.0",
            "optim.layer_decay=null",
            "train.micro_batch=4",
            "train.global_batch=4",
        ],
    )
    m = build_method(r).train()
    assert not m.encoder.training and m.head.training  # the frozen encoder stays in eval mode
    assert not any(p.requires_grad for p in m.encoder.parameters())
    m(batch_for(r), None).loss.backward()
    assert m.head.fc.weight.grad is not None
    opt, _ = build_optimizer(m, r, derive(r, 1, 1024), torch.device("cpu"))
    from timm.optim import Lars

    assert isinstance(opt, Lars)
    adapt = {tuple(p.shape): g["always_adapt"] for g in opt.param_groups for p in g["params"]}
    assert adapt == {(10, 96): True, (10,): False}  # MAE LARS: trust ratio on weights only


def test_recipe_checks() -> None:
    with pytest.raises(RecipeError, match="linprobe uses RRC"):
        load_recipe(TINY, ["finetune.mode=linprobe", "finetune.mixup=0.8"])
    with pytest.raises(RecipeError, match="even per-rank batch"):
        load_recipe(TINY, ["finetune.mixup=0.8", "train.micro_batch=3", "train.global_batch=3"])
    with pytest.raises(RecipeError, match="no classifier"):
        load_recipe(REPO / "recipes/mae/cpu_tiny.yaml", ["eval.at_end=true", "eval.top1=true", "data.val=x"])
