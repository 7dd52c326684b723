"""The documented chain, as written: demo data -> MAE pre-training (the demo's run) -> fine-tune
(the finetune recipe's launch line) -> export -> eval, run from a fresh working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mimscale.cli import main

pytestmark = pytest.mark.slow


def test_demo_finetune_export_eval(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    quick = ["train.max_steps=2", "train.ckpt_every=2", "data.num_workers=0"]
    assert main(["demo-data", "runs/demo/data"]) == 0
    # what `mimscale demo` trains: the MAE cpu_tiny recipe into runs/demo/mae
    assert main(["train", "mae/cpu_tiny", "run.out_dir=runs/demo", "run.name=mae", *quick]) == 0
    # recipes/finetune/cpu_tiny.yaml's launch line
    assert (
        main(["finetune", "recipes/finetune/cpu_tiny.yaml", "finetune.pretrained=runs/demo/mae", *quick]) == 0
    )
    run = Path("runs/finetune_cpu_tiny")
    assert (run / "checkpoints/LATEST").is_file()
    # its top-1 is printed with why a short fine-tune reads below the demo's frozen linear probe
    assert "after 2 optimizer steps of fine-tuning" in capsys.readouterr().err
    assert main(["export", str(run), "enc.safetensors"]) == 0 and Path("enc.safetensors").stat().st_size > 0
    assert main(["eval", str(run), "--top1", "--no-linear", "--out", "ev"]) == 0
    res = json.loads(Path("ev/eval.json").read_text())
    assert 0.0 <= res["top1"] <= 100.0 and 0.0 <= res["knn_top1"] <= 100.0
