"""The LATEST pointer and pruning, without a DeepSpeed engine (the launcher tests cover saves)."""

from __future__ import annotations

from pathlib import Path

from mimscale.config import derive
from mimscale.engine.checkpoint import POINTER, _prune, _write_pointer, read_pointer
from mimscale.engine.optim import lr_factor
from mimscale.registry import recipe_from_dict


def make_tags(d: Path, steps: list[int]) -> None:
    for s in steps:
        (d / f"step{s:08d}").mkdir(parents=True)


def test_pointer_names_only_complete_checkpoints(tmp_path: Path) -> None:
    assert read_pointer(tmp_path) is None
    make_tags(tmp_path, [2])
    _write_pointer(tmp_path, "step00000002")
    assert read_pointer(tmp_path) == "step00000002"
    (tmp_path / POINTER).write_text("step00000004\n")  # names a tag that is not on disk
    assert read_pointer(tmp_path) is None
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temp file behind


def test_prune_keeps_last_k_and_listed_steps(tmp_path: Path) -> None:
    make_tags(tmp_path, [2, 4, 6, 8, 10])
    _prune(tmp_path, keep_last=2, current="step00000010", keep_steps=frozenset({4}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004", "step00000008", "step00000010"]


def test_lr_schedule_matches_mae_formula() -> None:
    """Per-iteration warmup then half-cycle cosine, as MAE util/lr_sched (hand-computed points)."""
    r = recipe_from_dict(
        {
            "optim": {"lr": 1.0, "warmup_epochs": 1, "min_lr": 0.1},
            "train": {"epochs": 3, "global_batch": 10, "micro_batch": 10},
        }
    )
    d = derive(r, world_size=1, samples_per_epoch=100)  # 10 steps per epoch, 30 total, 10 warmup
    assert lr_factor(0, r, d) == 0.0 and lr_factor(5, r, d) == 0.5
    assert lr_factor(10, r, d) == 1.0
    assert abs(lr_factor(20, r, d) - (0.1 + 0.9 * 0.5)) < 1e-12  # half-way through the cosine
    assert abs(lr_factor(30, r, d) - 0.1) < 1e-12
    r.optim.schedule, r.optim.milestones, r.optim.gamma = "multistep", [2.0], 0.1
    assert lr_factor(19, r, d) == 1.0 and abs(lr_factor(20, r, d) - 0.1) < 1e-12


def test_world_of_one_does_not_leak_launcher_env(monkeypatch) -> None:
    """Child launchers started after an in-process run must not inherit RANK / MASTER_PORT."""
    import os

    from mimscale.engine.distributed import init_distributed

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
