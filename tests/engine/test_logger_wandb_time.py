"""The Unix ``time`` of each JSONL record is not sent to wandb as a metric."""

from __future__ import annotations

import json
from pathlib import Path

from mimscale.engine.logger import MetricLogger
from mimscale.registry import recipe_from_dict


def test_wandb_gets_metrics_but_not_the_unix_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = recipe_from_dict({"optim": {"blr": 1e-4}, "wandb": {"enabled": True, "mode": "offline"}})
    log = MetricLogger(r, tmp_path, rank=0)
    sent: list[dict] = []
    real = log.wandb.log

    def spy(data: dict, **kw) -> None:  # records what reaches the (real, offline) wandb run
        sent.append(dict(data))
        real(data, **kw)

    monkeypatch.setattr(log.wandb, "log", spy)
    log.log({"step": 1, "loss": 0.5, "lr": 1e-3})
    log.close()
    assert "time" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert sent == [{"step": 1, "loss": 0.5, "lr": 1e-3}]
