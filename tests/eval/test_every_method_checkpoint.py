"""`eval`, `export` and `diagnose` load a real (ZeRO-2, one process) checkpoint of every method.

LC-MAE's momentum copy travels as module extra state, which DeepSpeed's ZeRO consolidation
drops: the strict load used to fail with ``Missing key(s): "momentum_model._extra_state"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimscale.methods import METHODS
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]
# every registered method, plus MTO on its host (a plug-in adds parameters of its own)
RECIPES = {name: f"{name}/cpu_tiny.yaml" for name in METHODS} | {"mae_mto": "mto/mae_cpu_tiny.yaml"}


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory) -> dict[str, Path]:
    """Two optimizer steps of each recipe, checkpointed at the end (ZeRO-2 as the tiny recipes)."""
    from mimscale.engine.loop import train

    out = tmp_path_factory.mktemp("runs")
    done = {}
    for name, rel in RECIPES.items():
        r = load_recipe(REPO / "recipes" / rel, [
            f"data.train={digits['train']}", f"data.val={digits['val']}", f"run.out_dir={out}",
            f"run.name={name}", "train.max_steps=2", "train.global_batch=32", "train.micro_batch=16",
            "data.num_workers=0", "train.ckpt_every=2", "train.recon_every=1000"])  # fmt: skip
        done[name] = train(r)
    return done


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pixel_methods_leave_a_reconstruction_picture_at_the_end(runs, name) -> None:
    """Through the real loop (teacher, plug-in, two views and all): one picture at the last step
    for the methods that predict pixels, none for the others."""
    method = load_recipe(REPO / "recipes" / RECIPES[name]).method
    pictures = sorted(p.name for p in (runs[name] / "images").glob("*.png"))
    assert pictures == (["recon_step00000002.png"] if METHODS[method].reconstructs_pixels else [])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_eval_export_diagnose_load_every_method(runs, name, tmp_path) -> None:
    from mimscale.eval.diagnostics import main as diagnose
    from mimscale.eval.export import export_encoder
    from mimscale.eval.runs import load_method
    from mimscale.eval.standalone import run_eval

    run = runs[name]
    method, recipe = load_method(run)  # strict: every key of the method, extra state included
    if name == "lc_mae":
        assert method.momentum_model.num_updates == 2  # the EMA state came back, not a fresh copy
    res = run_eval(run, out=tmp_path / "eval", knn=True, linear=False, top1=False, batch_size=64)
    assert 0.0 <= res["knn_top1"] <= 100.0 and json.loads((tmp_path / "eval/eval.json").read_text())
    meta = export_encoder(run, tmp_path / "enc.safetensors")
    assert meta["num_tensors"] > 0
    assert diagnose(["spectrum", str(run), "--out", str(tmp_path / "diag"), "--num-images", "16"]) == 0
    assert (tmp_path / "diag/spectrum.json").is_file()
    x = torch.randn(1, 3, recipe.model.img_size, recipe.model.img_size)
    assert torch.isfinite(method.encoder(x).x).all()
