"""Metrics go to JSONL (and the console) on rank 0; wandb runs offline when a recipe enables it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mimscale.engine.logger import MetricLogger, format_eta
from mimscale.registry import recipe_from_dict


def test_jsonl_console_and_meta(tmp_path: Path, capsys) -> None:
    r = recipe_from_dict({"optim": {"blr": 1e-4}})
    log = MetricLogger(r, tmp_path, rank=0, extra_meta={"teacher": {"random": True}})
    log.log({"step": 1, "loss": 0.5}, "step 1 loss 0.5")
    log.log({"step": 2, "loss": 0.25})
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in recs] == [(1, 0.5), (2, 0.25)]
    assert json.loads((tmp_path / "meta.json").read_text()) == {"teacher": {"random": True}}
    assert "step 1 loss 0.5" in capsys.readouterr().out
    other = tmp_path / "rank1"
    other.mkdir()
    MetricLogger(r, other, rank=1).log({"step": 1, "loss": 1.0}, "x")
    assert not list(other.iterdir())  # only rank 0 writes
    assert format_eta(3725) == "1:02:05"


def test_wandb_offline_writes_a_local_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = recipe_from_dict(
        {"optim": {"blr": 1e-4}, "wandb": {"enabled": True, "mode": "offline", "tags": ["t"]}}
    )
    log = MetricLogger(r, tmp_path, rank=0)
    assert log.wandb is not None
    log.log({"step": 1, "loss": 0.5})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run directory"
    run_id = (tmp_path / "wandb_id").read_text().strip()
    again = MetricLogger(r, tmp_path, rank=0)  # a restart of the same run directory
    assert again.wandb.id == run_id
    again.close()
    # wandb names a second directory made in the same second "...-<id>-1"
    pattern = rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?"
    assert all(re.fullmatch(pattern, d.name) for d in (tmp_path / "wandb").glob("offline-run-*"))


def test_rewind_keeps_each_step_once_and_drops_a_torn_line(tmp_path: Path) -> None:
    r = recipe_from_dict({"optim": {"blr": 1e-4}})
    log = MetricLogger(r, tmp_path, rank=0)
    for s in range(1, 6):
        log.log({"step": s, "loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    log.rewind(3)  # resumed from the step-3 checkpoint
    for s in range(4, 7):
        log.log({"step": s, "loss": float(s)})
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4, 5, 6]


def test_wandb_id_is_kept_in_the_run_dir(tmp_path: Path) -> None:
    from mimscale.engine.logger import wandb_run_id

    first = wandb_run_id(tmp_path)
    assert first == wandb_run_id(tmp_path) == (tmp_path / "wandb_id").read_text().strip()
    assert first != wandb_run_id(tmp_path / "..")


def test_img_per_s_and_eta_exclude_eval_and_checkpoint_time(tmp_path: Path) -> None:
    """A 10 s step window of which 8 s were an eval hook and a checkpoint: 2 s of training."""
    from types import SimpleNamespace

    import torch

    from mimscale.engine.loop import Trainer

    r = recipe_from_dict({"optim": {"blr": 1e-4}, "train": {"global_batch": 64}})
    fake = SimpleNamespace(
        recipe=r,
        state=SimpleNamespace(
            step=4, samples=256, bad_steps=0, metrics={"loss": torch.tensor(8.0)}, good=torch.tensor(4.0)
        ),
        engine=SimpleNamespace(get_lr=lambda: [1e-3]),
        paused={"eval_s": 6.0, "ckpt_s": 2.0},
        logger=MetricLogger(r, tmp_path, rank=0),
        loader=SimpleNamespace(shard_errors=0),
        dist=SimpleNamespace(device=torch.device("cpu")),
    )
    Trainer._log(fake, elapsed=10.0, wait=0.0, steps=4, stop=8, micro=[{}])
    (rec,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rec["img_per_s"] == 4 * 64 / 2.0 and rec["eval_s"] == 6.0 and rec["ckpt_s"] == 2.0
    assert fake.paused == {"eval_s": 0.0, "ckpt_s": 0.0}  # counted once
