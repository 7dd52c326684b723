"""`mimscale finetune` / `mimscale linprobe`: fine-tuning recipes only, launched as `train` launches them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimscale import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/finetune/cpu_tiny.yaml")


@pytest.fixture
def launched(monkeypatch) -> list:
    """Stand in for `train` (its own tests launch real runs): record what it would launch."""
    calls: list = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: calls.append(args) or 0)
    return calls


def test_finetune_hands_the_recipe_to_train(launched) -> None:
    assert cli.main(["finetune", TINY, "train.epochs=3", "--nproc", "2", "--launcher", "torchrun"]) == 0
    (args,) = launched
    assert (args.recipe, args.overrides) == (TINY, ["train.epochs=3"])
    assert (args.nproc, args.launcher) == (2, "torchrun")


def test_linprobe_sets_the_mode_before_the_user_overrides(launched, capsys) -> None:
    assert cli.main(["linprobe", TINY, "finetune.mixup=0.0"]) == 0
    assert launched[0].overrides == ["finetune.mode=linprobe", "finetune.mixup=0.0"]
    # the linprobe checks apply: mixup is refused in that mode (and nothing is launched)
    assert cli.main(["linprobe", TINY, "finetune.mixup=0.8"]) == 2
    assert "linprobe uses RRC" in capsys.readouterr().err and len(launched) == 1


def test_pretraining_recipe_is_refused(launched, capsys) -> None:
    mae = str(REPO / "recipes/mae/cpu_tiny.yaml")
    assert cli.main(["finetune", mae]) == 2
    assert "mimscale finetune needs method 'finetune', got 'mae'" in capsys.readouterr().err
    assert launched == []
