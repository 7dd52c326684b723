"""`mimscale demo --method NAME`: the names come from the tiny recipes on disk, not from a list."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimscale.demo.run import demo_recipes, run_demo
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def test_demo_names_follow_the_tiny_recipes(tmp_path: Path) -> None:
    for rel in ("_base/cpu_tiny.yaml", "zeta/cpu_tiny.yaml", "alpha/cpu_tiny.yaml", "alpha/vit_b16.yaml",
                "plug/alpha_cpu_tiny.yaml", "plug/notes.yaml"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")
    assert demo_recipes(tmp_path) == {
        "alpha": "alpha/cpu_tiny.yaml",
        "zeta": "zeta/cpu_tiny.yaml",
        "alpha_plug": "plug/alpha_cpu_tiny.yaml",
    }


def test_shipped_demos_are_every_tiny_recipe_and_load() -> None:
    demos = demo_recipes()
    # the demos offered before the names were derived
    assert {"mae", "simmim", "cae_v2", "mr_mae", "lc_mae", "mae_mto"} <= set(demos)
    assert demos["mae_mto"] == "mto/mae_cpu_tiny.yaml"
    # a classifier needs a pre-trained checkpoint: not a demo (finetune/cpu_tiny.yaml, and
    # finetune/linprobe_cpu_tiny.yaml, which the plug-in naming would call "linprobe_finetune")
    assert not [name for name, rel in demos.items() if rel.startswith("finetune/")]
    for name, rel in demos.items():
        r = load_recipe(REPO / "recipes" / rel)
        assert rel.split("/")[0] in (r.method, name.split("_")[-1])  # method folder or plug-in folder


def test_unknown_demo_lists_the_available_ones(tmp_path: Path, capsys) -> None:
    assert run_demo("nope", tmp_path) == 2
    out = capsys.readouterr().out
    assert "no CPU demo for method 'nope'" in out and "mae_mto" in out
    assert not (tmp_path / "data").exists()  # nothing written for a typo


def test_every_demo_trains_the_same_student_for_the_same_steps(tmp_path: Path) -> None:
    """Like for like: no method silently gets another patch size, epochs, batch or readout."""
    from dataclasses import asdict

    from mimscale.demo.run import describe, prepare

    shared = None
    for name in demo_recipes():
        recipe, info = prepare(name, tmp_path, teacher="random")
        now = (asdict(recipe.model)["img_size"], recipe.model.patch_size, recipe.model.embed_dim,
               recipe.model.depth, recipe.train.epochs, recipe.train.global_batch, recipe.eval.pool,
               recipe.eval.every)  # fmt: skip
        assert shared is None or now == shared, (name, now, shared)
        shared = now
        line = describe(recipe)
        assert line.startswith("mask ")
        if name in ("cae_v2", "mr_mae"):  # the control is labelled as one, in the run name too
            assert "RANDOM (control)" in line and "RANDOM" in info["teacher"]
            assert recipe.run.name == f"{name}_random_teacher"
        else:
            assert info["teacher"] is None and "teacher" not in line
    assert shared[1] == 4 and shared[4] == 10 and shared[5] == 32 and shared[6] == "mean"


def test_demo_help_lists_the_methods_and_defaults(capsys, monkeypatch) -> None:
    from mimscale.cli import parse_args

    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal: keep each help on one line
    from mimscale.demo import DEFAULT_METHOD

    with pytest.raises(SystemExit) as stop:
        parse_args(["demo", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name, rel in demo_recipes().items():
        assert f"  {name} " in out and rel in out
    assert f"(default: {DEFAULT_METHOD})" in out and "(default: runs/demo)" in out
    assert "(default: trained)" in out and "(default: online)" in out and "(default: )" not in out
    assert "MAE + MTO" in out and "mto/mae_cpu_tiny.yaml      MAE + MTO  (default)" in out


def test_method_name_names_the_plug_in() -> None:
    from mimscale.demo.report import method_name

    assert method_name(load_recipe(REPO / "recipes/mto/mae_cpu_tiny.yaml")) == "mae + mto"
    assert method_name(load_recipe(REPO / "recipes/mae/cpu_tiny.yaml")) == "mae"
