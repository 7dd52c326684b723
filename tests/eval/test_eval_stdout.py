"""`mimscale eval` / `export` keep stdout for their result (issue 25, items 14 and 17): DeepSpeed's
zero_to_fp32 chatter goes to stderr, and an export of a non-stock shape says so where its timm
name is printed and where it is stored. Item 16: the logged lr under layer decay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimscale.cli import main
from mimscale.config import Derived
from mimscale.engine.optim import lr_factor
from mimscale.eval.export import stock_differences
from mimscale.models.vit import ViTEncoder
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "mimscale.cli", *argv], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow  # trains through the CLI, then runs two CLI subprocesses
def test_eval_and_export_stdout_is_the_result(tmp_path: Path, digits) -> None:
    quick = ["train.max_steps=2", "train.ckpt_every=2", "data.num_workers=0", "train.zero_stage=1"]
    run = tmp_path / "runs/mae"
    data = [f"data.train={digits['train']}", f"data.val={digits['val']}"]
    assert main(["train", "mae/cpu_tiny", f"run.out_dir={run.parent}", "run.name=mae", *data, *quick]) == 0
    tag = run / "checkpoints" / (run / "checkpoints/LATEST").read_text().strip()
    assert any(tag.glob("*optim_states.pt")), "a ZeRO checkpoint: eval consolidates it with zero_to_fp32"

    # fine-tune it under layer decay: the logged lr is the schedule's (the head's), not group 0's
    ft = ["finetune", "finetune/cpu_tiny", f"finetune.pretrained={run}", f"run.out_dir={run.parent}",
          "run.name=ft", *data, "train.max_steps=2", "train.log_every=1", "data.num_workers=0",
          "eval.at_end=false", "optim.layer_decay=0.75"]  # fmt: skip
    _cli(*ft, cwd=tmp_path)  # a fresh process: a second DeepSpeed engine in this one trips an import lock
    r = load_recipe(run.parent / "ft/recipe.yaml")
    assert r.optim.layer_decay == 0.75
    d = Derived(**json.loads((run.parent / "ft/meta.json").read_text())["derived"])
    recs = [
        x for x in map(json.loads, (run.parent / "ft/metrics.jsonl").read_text().splitlines()) if "lr" in x
    ]
    assert [x["step"] for x in recs] == [1, 2]
    for x in recs:
        assert abs(x["lr"] - d.lr * lr_factor(x["step"], r, d)) < 1e-12, x

    ev = _cli("eval", str(run), "--no-linear", "--train", digits["train"], cwd=tmp_path)
    lines = ev.stdout.splitlines()
    assert len(lines) == 1, ev.stdout  # nothing but the result: `mimscale eval ... | jq` works
    assert "knn_top1" in json.loads(lines[0])
    assert "zero" in ev.stderr.lower(), "DeepSpeed's consolidation still speaks, on stderr"

    ex = _cli("export", str(run), "enc.safetensors", cwd=tmp_path)
    out, load = ex.stdout.splitlines()
    meta = json.loads(out)
    assert meta["timm_name"] == "vit_tiny_patch16_224" and meta["stock_shape"] is False
    assert (
        meta["shape_note"].startswith("NOT the stock vit_tiny_patch16_224: ")
        and "**timm_kwargs" in meta["shape_note"]
    )
    assert load.startswith("load (non-stock shape: the kwargs are required): timm.create_model(")
    assert "NOT the stock vit_tiny_patch16_224" in ex.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "enc.safetensors"), framework="pt") as f:
        stored = f.metadata()
    assert json.loads(stored["stock_shape"]) is False and "NOT the stock" in json.loads(stored["shape_note"])


def test_stock_differences() -> None:
    """Empty for a stock shape; every mismatched tensor for a tiny or 12-head ViT-T encoder."""
    for recipe, stock in (("mae/vit_b16", True), ("mae/cpu_tiny", False), ("cae_v2/vit_t16", False)):
        r = load_recipe(REPO / f"recipes/{recipe}.yaml")
        with torch.device("meta"):
            enc = ViTEncoder(r.model)
        weights = dict(enc.vit.state_dict())
        differ = stock_differences(enc.timm_name, weights)
        assert (differ == []) == stock, (recipe, differ[:5])
    assert stock_differences("vit_tiny_patch16_224", {}) != []  # missing tensors count too
