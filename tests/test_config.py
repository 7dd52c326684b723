"""Recipe inheritance, overrides, derived values and every validation error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mimscale.config import RecipeError, apply_overrides, derive, parse_override
from mimscale.registry import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", [p for p in RECIPES if "_base" not in p.parts], ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path: Path) -> None:
    r = load_recipe(path)
    # one folder per method; plug-in recipes (folder "mto") run a host method with the plug-in on
    assert r.method == path.parent.name or (path.parent.name == "mto" and r.mto.enabled)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("Launch" in line for line in header), "the header gives the exact launch line"
    assert any("Cost" in line for line in header) and any(
        "xpected" in line or "result" in line for line in header
    )


def test_base_inheritance_and_override(tmp_path: Path) -> None:
    write(tmp_path, "_base/a.yaml", "optim: {blr: 1.0e-4, betas: [0.9, 0.99]}\ntrain: {epochs: 5}\n")
    p = write(tmp_path, "exp/b.yaml", "_base_: ../_base/a.yaml\ntrain: {epochs: 7}\n")
    r = load_recipe(p, ["optim.weight_decay=0.1", "run.name=x"])
    assert r.optim.blr == 1e-4 and r.optim.betas == [0.9, 0.99]  # from the base
    assert r.train.epochs == 7.0  # the delta wins, int widened to float
    assert r.optim.weight_decay == 0.1 and r.run.name == "x"  # overrides win last


def test_base_depth_limited(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "optim: {blr: 1.0e-4}\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    write(tmp_path, "c.yaml", "_base_: b.yaml\n")
    d = write(tmp_path, "d.yaml", "_base_: c.yaml\n")
    with pytest.raises(RecipeError, match="deeper than 2"):
        load_recipe(d)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", r"optim\.lrr: unknown key"),
        ("train.epochs=abc", r"train\.epochs: expected float, got str"),
        ("train.zero_stage=1.5", r"train\.zero_stage: expected int"),
        ("mask.kind=blocky", r"mask\.kind: expected one of"),
        ("mae.norm_pix=3", r"mae\.norm_pix: expected bool"),
        ("simmim.x=1", r"simmim: section for method 'simmim' but method is 'mae'"),
        ("method=byol", r"unknown method 'byol'"),
        ("train.micro_batch=100", r"train\.global_batch: .* not a multiple"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, override: str, match: str) -> None:
    p = write(
        tmp_path, "r.yaml", "method: mae\noptim: {blr: 1.0e-4}\ntrain: {global_batch: 256, micro_batch: 64}\n"
    )
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(p, [override])
    assert str(p) in str(e.value)


def test_missing_required_lr(tmp_path: Path) -> None:
    p = write(tmp_path, "r.yaml", "method: mae\n")
    with pytest.raises(RecipeError, match=r"optim\.lr: give exactly one"):
        load_recipe(p)


def test_override_parsing() -> None:
    assert parse_override("optim.betas=[0.9, 0.95]") == (["optim", "betas"], [0.9, 0.95])
    assert parse_override("model.layer_scale=null") == (["model", "layer_scale"], None)
    r = recipe_from_dict(apply_overrides({}, ["optim.lr=2e-4", "optim.min_lr=1E-6"]))
    assert r.optim.lr == 2e-4 and r.optim.min_lr == 1e-6  # YAML 1.1 reads these as strings
    with pytest.raises(RecipeError, match=r"optim\.lr: expected float or null, got str 'fast'"):
        recipe_from_dict(apply_overrides({}, ["optim.lr=fast"]))
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        parse_override("optim.lr")


def test_derived_values() -> None:
    r = recipe_from_dict(
        {
            "optim": {"blr": 1.5e-4, "warmup_epochs": 2},
            "train": {"global_batch": 4096, "micro_batch": 128, "epochs": 10},
        }
    )
    d = derive(r, world_size=8, samples_per_epoch=4096 * 100)
    assert d.lr == pytest.approx(2.4e-3)  # MAE: blr * B / 256
    assert d.grad_accum == 4 and d.steps_per_epoch == 100 and d.total_steps == 1000 and d.warmup_steps == 200
    r.optim.lr_scaling = "sqrt"
    assert derive(r, 8, 409600).lr == pytest.approx(1.5e-4 * 64 / 4)  # LC-MAE: blr * sqrt(B) / 4
    with pytest.raises(RecipeError, match="not divisible by train.micro_batch=128 x world_size=3"):
        derive(r, world_size=3, samples_per_epoch=409600)


def test_cli_check_fails_before_spawning(tmp_path: Path) -> None:
    """A typo is reported by the CLI (exit 2) before any launcher runs."""
    p = write(tmp_path, "r.yaml", "_base_: " + str(REPO / "recipes/mae/cpu_tiny.yaml") + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "mimscale.cli", "train", str(p), "optim.blrr=1", "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "optim.blrr: unknown key" in out.stderr and str(p) in out.stderr


def test_import_is_light() -> None:
    code = (
        "import sys, mimscale, mimscale.config, mimscale.cli; "
        "bad = [m for m in ('deepspeed', 'wandb', 'open_clip', 'webdataset') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
