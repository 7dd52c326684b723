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


def test_a_short_fine_tunes_top1_gets_a_note_and_a_long_one_none(tmp_path) -> None:
    import json

    def run(steps: int) -> str | None:
        lines = [{"step": s, "loss": 2.0} for s in range(10, steps + 1, 10)]
        (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in [*lines, {"step": steps,
                                                "eval/top1": 30.08}]) + "\n")  # fmt: skip
        return cli.short_finetune_note(tmp_path)

    note = run(110)
    assert note and "top-1 30.1% after 110 optimizer steps" in note and "linprobe_cpu_tiny" in note
    assert run(cli.SHORT_FINETUNE) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    assert cli.short_finetune_note(tmp_path) is None  # no top-1 (eval off): nothing to explain
