"""Metrics go to JSONL (and the console) on rank 0; wandb runs offline when a recipe enables it."""

from __future__ import annotations

import json
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
