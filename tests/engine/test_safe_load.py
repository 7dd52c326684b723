"""Checkpoint files are read weights-only: a crafted pickle is refused before it runs, while
genuine DeepSpeed checkpoints of every ZeRO stage still load (export, eval, fine-tune, resume)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import REPO, python, run_cmd

from mimscale.engine.safe_load import UnsafeCheckpointError, load_file, safe_torch_load

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")


class Payload:
    """Unpickling this runs ``touch MARKER`` (what a downloaded checkpoint could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker, evil = tmp_path / "PWNED", tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match=f"{evil}: refused to load.*system"):
        load_file(evil)
    # DeepSpeed asks for weights_only=False: inside the safe block it is weights-only anyway
    with safe_torch_load(), pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        torch.load(evil, map_location="cpu", weights_only=False)
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"  # restored
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3, "data": {"epoch": 1, "keys": ["a"]}}, good)
    assert load_file(good)["step"] == 3


def test_rng_state_file_is_weights_only_and_restores(tmp_path: Path) -> None:
    import random

    import numpy as np

    from mimscale.engine.checkpoint import _load_rng, _rng_state, _set_rng_state

    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rng.pt")) == []
    first = (np.random.rand(), random.gauss(0, 1), torch.rand(1).item())
    _set_rng_state(_load_rng(tmp_path / "rng.pt"))
    assert (np.random.rand(), random.gauss(0, 1), torch.rand(1).item()) == first


def _args(digits: dict, out: Path, name: str, stage: int, steps: int) -> list[str]:
    kw = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(out),
        "run.name": name,
        "train.zero_stage": stage,
        "train.max_steps": steps,
        "train.global_batch": 64,
        "train.micro_batch": 64,
        "data.num_workers": 1,
    }
    return [f"{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def genuine(digits, tmp_path_factory) -> dict[int, Path]:
    """One-step checkpoints at ZeRO stages 0-3 (real DeepSpeed, one process)."""
    out = tmp_path_factory.mktemp("zero")
    for stage in (0, 1, 2, 3):
        run_cmd([python(), "-m", "mimscale.train", RECIPE, *_args(digits, out, f"z{stage}", stage, 1)])
    return {stage: out / f"z{stage}" for stage in (0, 1, 2, 3)}


def _craft(run: Path, marker: Path) -> Path:
    """Rewrite the run's model-states file with a payload beside the genuine weights."""
    tag_dir = next((run / "checkpoints").glob("step*"))
    f = next(tag_dir.glob("*mp_rank_00_model_states.pt"))
    sd = load_file(f)
    sd["payload"] = Payload(marker)
    torch.save(sd, f)
    return f


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_loads_and_a_crafted_one_is_refused(genuine, digits, tmp_path, stage) -> None:
    from mimscale.cli import main as cli
    from mimscale.eval.runs import load_method
    from mimscale.methods.finetune import load_pretrained_encoder

    method, _ = load_method(genuine[stage])  # strict: every key, frozen pos_embed included
    assert cli(["export", str(genuine[stage]), str(tmp_path / "enc.safetensors")]) == 0

    run, marker = tmp_path / "evil", tmp_path / "PWNED"
    shutil.copytree(genuine[stage], run)
    bad = _craft(run, marker)
    with pytest.raises(UnsafeCheckpointError, match=f"{bad.name}: refused to load"):
        load_method(run)  # `mimscale eval`
    with pytest.raises(UnsafeCheckpointError, match=bad.name):
        load_pretrained_encoder(method.encoder, str(run))  # finetune.pretrained=
    assert cli(["export", str(run), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    res = subprocess.run(  # resume: the trainer reloads the crafted checkpoint
        [python(), "-m", "mimscale.train", RECIPE, *_args(digits, tmp_path, "evil", stage, 2)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{bad}: refused to load" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()
