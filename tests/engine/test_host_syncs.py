"""A training step never waits for the device outside log and checkpoint steps.

Every way a tensor reaches the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``,
``float()``, ``int()``, ``.numpy()`` of a tensor on the training device...) is counted through
patched ``torch.Tensor`` methods while a real run trains (one process, DeepSpeed, real shards);
each call is attributed to the step being processed. On a CPU every tensor is on the "device", so
this counts strictly more than a GPU run would sync. The stop poll's CPU flag is exempt by
construction (a gloo tensor; a world of one reads a Python flag).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from launch import REPO, nan_forward_patch, nan_forward_script, python

RECIPE = str(REPO / "recipes/mae/cpu_tiny.yaml")

SCRIPT = (
    r"""
import json, sys, traceback, torch
from mimscale.engine import loop
from mimscale.registry import load_recipe

events = []  # ("step", attempt) markers and ("sync", name, where) calls
state = {"in": False}

def counted(name, orig):
    def f(self, *a, **k):
        if not state["in"]:
            state["in"] = True
            try:
                stack = traceback.extract_stack(limit=6)
                tb = stack[-2]
                # prepare_batch reads the collated batch on the host (valid rows, the masks'
                # visible count) before it moves to the device: no device sync on a GPU.
                if not any(f.name == "prepare_batch" for f in stack):
                    events.append(("sync", name, f"{tb.filename.split('/')[-1]}:{tb.lineno}"))
            finally:
                state["in"] = False
        return orig(self, *a, **k)
    return f

for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

orig_step = loop.Trainer.train_step
def train_step(self, micro):
    events.append(("step", self.state.step + 1))
    return orig_step(self, micro)
loop.Trainer.train_step = train_step

BAD = {int(x) for x in sys.argv[1].split(",") if x}
"""
    + nan_forward_patch("n in BAD")
    + r"""

t = loop.Trainer(load_recipe(sys.argv[2], sys.argv[3:]))
events.clear()
t.fit()
out = []
for e in events:
    if e[0] == "step":
        out.append({"attempt": e[1], "syncs": []})
    elif out:
        out[-1]["syncs"].append(e[1:])
print("RESULT " + json.dumps(out))
"""
)


def run(digits, tmp_path, bad: str, **kw) -> tuple[list[dict], list[dict]]:
    base = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(tmp_path),
        "run.name": "s",
        "train.global_batch": 32,
        "train.micro_batch": 16,
        "train.max_steps": 9,
        "train.log_every": 4,
        "train.ckpt_every": 1000,
        "data.num_workers": 1,
    }
    base.update(kw)
    script = tmp_path / "syncs.py"
    script.write_text(SCRIPT)
    res = subprocess.run(
        [python(), str(script), bad, RECIPE, *(f"{k}={v}" for k, v in base.items())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    recs = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    return json.loads(line[7:]), recs


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_no_host_sync_outside_log_steps(digits, tmp_path, zero: int) -> None:
    """Two micro-batches per step; forward call 5 (step 3) is NaN: skipped on the device,
    counted at the step-4 log line, and the run still makes its 9 steps."""
    steps, recs = run(digits, tmp_path, "5", **{"train.zero_stage": zero})
    assert [s["attempt"] for s in steps] == list(range(1, 10))
    for s in steps:
        # the step that ends at a log step (4, 8) or the last step (9) may sync; no other may
        if s["attempt"] % 4 and s["attempt"] != 9:
            assert s["syncs"] == [], s
    assert any(s["syncs"] for s in steps)  # the counter does see the log steps' reads
    assert [r["step"] for r in recs] == [4, 8, 9]
    assert recs[0]["bad_steps"] == 1 and all(r["loss"] == r["loss"] for r in recs)  # no NaN mean


# rank 1 only; step 3 and step 7
RANK_NAN = nan_forward_script('os.environ.get("RANK") == "1" and n in (3, 8)', header="import os, sys")


@pytest.mark.slow
def test_non_finite_skip_agrees_across_two_ranks(digits, tmp_path) -> None:
    """A NaN on rank 1 alone skips the step on both ranks (no hang at ZeRO-2's reduction): one
    bad step read at a log step (3), one between log steps (7, counted at step 8)."""
    import shutil

    from launch import free_port

    script = tmp_path / "rank_nan.py"
    script.write_text(RANK_NAN)
    kw = {
        "data.train": digits["train"],
        "data.val": digits["val"],
        "run.out_dir": str(tmp_path),
        "run.name": "r",
        "train.global_batch": 32,
        "train.micro_batch": 16,
        "train.max_steps": 8,
        "train.log_every": 4,
        "train.ckpt_every": 3,
        "train.zero_stage": 2,
        "data.num_workers": 1,
    }
    ds = shutil.which("deepspeed") or "deepspeed"
    cmd = [ds, "--num_gpus=2", f"--master_port={free_port()}", str(script), RECIPE]
    res = subprocess.run(
        [*cmd, *(f"{k}={v}" for k, v in kw.items())], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "step 2: non-finite loss, step skipped" in res.stdout  # read at the step-3 checkpoint step
    assert "earlier step(s) with a non-finite loss were skipped on the device" in res.stdout
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 8 and recs[-1]["bad_steps"] == 2
    assert all(r["loss"] == r["loss"] for r in recs)
