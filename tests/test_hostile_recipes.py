"""Hostile recipes (issue 25): bounded YAML, non-finite numbers, overrides named as the source,
shipped ``_base_`` names, the resumed checkpoint's recipe through the one loader.

What the user sees is one line on stderr and exit 2, before any process starts: the CLI cases run
``mimscale`` in a subprocess (an alias bomb must not be walked, a deep document must not recurse).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from mimscale.cli import main
from mimscale.config import Recipe, RecipeError, paths, safe_yaml
from mimscale.config.loader import parse_file
from mimscale.registry import load_recipe, method_configs, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
BASE = "_base_: mae/cpu_tiny\n"


def _bomb(levels: int, width: int = 9) -> str:
    """The billion laughs: each level a list of ``width`` references to the one below."""
    lines = [f"l0: &l0 [{', '.join(['1'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _bomb_in_key(levels: int) -> str:
    """A recipe whose ``mae.decoder_dim`` is the bomb (the issue's 580-byte file, 10 levels)."""
    body = _bomb(levels).replace("\n", "\n  ")
    return BASE + f"x_:\n  {body}\nmae: {{decoder_dim: *l{levels - 1}}}\n"


HOSTILE_FILES = {
    "alias_bomb_in_a_key": (_bomb_in_key(10), "aliases (*name) are expanded"),
    "alias_bomb_top_level": (_bomb(12), "aliases (*name) are expanded"),
    "deep_flow_list": ("run: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
    "deep_flow_mapping": ("run: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested deeper than 32"),
    "deep_block_lists": ("run:\n" + "".join(" " * i + "-\n" for i in range(200)), "nested deeper"),
    "too_large": (BASE + "# " + "x" * (safe_yaml.MAX_BYTES + 10) + "\n", "a recipe is at most"),
}


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # timeout: a guard against a hang (the bug), not a speed assertion
    return subprocess.run(
        [sys.executable, "-m", "mimscale.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _one_line(p: subprocess.CompletedProcess[str]) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert len(err) < 1000, "never format an unbounded value into an error"
    return err


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_yaml_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    text, expected = HOSTILE_FILES[case]
    (tmp_path / "r.yaml").write_text(text)
    err = _one_line(_cli("check", "r.yaml", cwd=tmp_path))
    assert expected in err and "r.yaml" in err, err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("mae.decoder_dim=" + "[" * 100 + "]" * 100, "nested deeper than 32"),
        (
            "mae.decoder_dim=[&a [1,1,1,1,1,1,1,1,1,1], "
            + ", ".join(["[*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]"] * 3)
            + "]",
            "expected int, got list",
        ),  # fmt: skip
        ("a" + ".a" * 5000 + "=1", "key nested deeper than 32 levels"),
    ],
    ids=["deep", "aliases", "deep_key"],
)
def test_hostile_override_values(tmp_path: Path, capsys, override: str, expected: str) -> None:
    (tmp_path / "r.yaml").write_text(BASE)
    assert main(["check", str(tmp_path / "r.yaml"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and len(err) < 1000, err


def test_bounded_loader_counts_aliases_as_used() -> None:
    """Below the bound an aliased document loads as plain data (and shares nothing surprising)."""
    data = safe_yaml.load(_bomb(4, width=3))  # 1 + 3 + 9 + 27 values: far below the bound
    assert data["l3"] == [[[[1, 1, 1]] * 3] * 3] * 3
    with pytest.raises(RecipeError, match="aliases"):
        safe_yaml.load(_bomb(7, width=9))  # 9**6 = 531441 values once expanded
    assert safe_yaml.load("a: " + "[" * 31 + "]" * 31) is not None  # 32 levels with the mapping
    with pytest.raises(RecipeError, match="line 1: nested deeper than 32"):
        safe_yaml.load("a: " + "[" * 32 + "]" * 32)


# --------------------------------------------------------------- numbers: every float field


def _float_fields(cls: type, where: str) -> list[tuple[str, bool]]:
    """(dotted key, is a list of floats) for every settable float field below dataclass ``cls``."""
    out: list[tuple[str, bool]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp, key = hints[f.name], f"{where}.{f.name}".lstrip(".")
        args = typing.get_args(tp)
        if tp is float or float in args:
            out.append((key, False))
        elif typing.get_origin(tp) is list and float in typing.get_args(args[0]) + (args[0],):
            out.append((key, True))
        elif dataclasses.is_dataclass(tp):
            out += _float_fields(tp, key)  # type: ignore[arg-type]
    return out


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[last] = value


FLOAT_FIELDS = [(m, k, is_list) for m, cfg in method_configs().items()
                for k, is_list in _float_fields(Recipe, "") + _float_fields(cfg, m)]  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e308])
def test_every_float_field_refuses_non_finite_and_absurd(bad: float) -> None:
    """Every float field of every section and method: a RecipeError naming the key, never a value
    that kills the ranks after launch (torch's "Invalid learning rate", an OverflowError)."""
    assert len(FLOAT_FIELDS) > 60, "the walk found the schema's float fields"
    for method, key, is_list in FLOAT_FIELDS:
        if key.startswith("data.views"):
            continue  # a list of mappings: covered below
        raw: dict[str, Any] = {"method": method, "optim": {"blr": 1e-4}}
        _set(raw, key, [0.5, bad] if is_list else bad)
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(raw, "<test>")
        msg = str(e.value)
        assert f"{key}{'[1]' if is_list else ''}: " in msg and ("finite" in msg or "out of range" in msg), msg
    with pytest.raises(RecipeError, match=r"data\.views\[0\]\.scale\[0\]: nan is not a finite number"):
        recipe_from_dict({"optim": {"blr": 1e-4}, "data": {"views": [{"scale": [float("nan"), 1.0]}]}})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim: {blr: .nan}", "optim.blr: nan is not a finite number"),
        ("optim: {blr: .inf}", "optim.blr: inf is not a finite number"),
        ("optim: {blr: null, lr: -.inf}", "optim.lr: -inf is not a finite number"),
        ("train: {epochs: 1e308, max_steps: null}", "train.epochs: '1e308' is out of range"),
        ("train: {epochs: 1.0e+308, max_steps: null}", "train.epochs: 1e+308 is out of range"),
        ("train: {global_batch: 100000000000000000000}", "train.global_batch: 100000000000000000000 is out"),
        ("mask: {ratio: 1e999}", "mask.ratio: '1e999' is out of range"),
        ("mto: {lambda_e: .nan}", "mto.lambda_e: nan is not a finite number"),
    ],
)
def test_bad_numbers_are_recipe_errors_before_spawning(
    tmp_path: Path, capsys, digits, text, expected
) -> None:
    """`mimscale train` refuses them in the CLI process: no launcher, no rank, no run directory."""
    path = tmp_path / "r.yaml"
    path.write_text(
        f"{BASE}{text}\nrun: {{out_dir: {tmp_path / 'runs'}}}\ndata: {{train: {digits['train']}}}\n"
    )
    code = main(["train", str(path), "--nproc", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err and str(path) in err, err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------- overrides and shipped bases


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochz=3", "train.epochz: unknown key (did you mean train.epochs? "),
        ("teachr.layer=2", "teachr: unknown key (did you mean teacher? "),
        ("optim.blr=.nan", "optim.blr: nan is not a finite number"),
        ("mae.decoder_dim=wide", "mae.decoder_dim: expected int, got str 'wide'"),
    ],
)
def test_override_errors_name_the_override(tmp_path: Path, override: str, expected: str) -> None:
    """A shipped recipe by name: the error is the override's, not the shipped (site-packages) file's."""
    err = _one_line(_cli("check", "mae/cpu_tiny", override, cwd=tmp_path))
    assert err.startswith(f"recipe error: override '{override}' (on "), err
    assert expected in err and "mean ." not in err and "of ." not in err, err


def test_file_errors_still_name_the_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(BASE + "optim: {blr: .nan}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["train.epochs=3"])
    assert str(e.value).startswith(f"{path}: optim.blr: nan"), e.value


@pytest.mark.parametrize(
    "base", ["mae/cpu_tiny", "mae/cpu_tiny.yaml", "[mae/cpu_tiny]", "recipes/mae/cpu_tiny.yaml"]
)
def test_base_names_a_shipped_recipe(tmp_path: Path, base: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(f"_base_: {base}\ntrain: {{epochs: 3}}\n")
    r = load_recipe(path)
    shipped = load_recipe(REPO / "recipes/mae/cpu_tiny.yaml")
    assert r.train.epochs == 3 and r.method_cfg == shipped.method_cfg and r.model == shipped.model


def test_base_names_a_shipped_recipe_from_a_wheel(tmp_path: Path, monkeypatch) -> None:
    """In a wheel the recipes live in mimscale/recipes: a user's file elsewhere still finds them."""
    pkg = tmp_path / "site-packages/mimscale"
    shutil.copytree(REPO / "recipes", pkg / "recipes")
    (pkg / "recipes/mae/cpu_tiny.yaml").write_text(
        (REPO / "recipes/mae/cpu_tiny.yaml").read_text().replace("decoder_dim: 64", "decoder_dim: 48")
    )
    monkeypatch.setattr(paths, "_PACKAGE", pkg)
    mine = tmp_path / "elsewhere/mine.yaml"
    mine.parent.mkdir()
    mine.write_text("_base_: mae/cpu_tiny\n")
    assert load_recipe(mine).method_cfg.decoder_dim == 48  # the wheel's copy, not the checkout's
    mine.write_text("_base_: mae/no_such\n")
    with pytest.raises(RecipeError, match=r"mae/no_such: recipe file not found \(the _base_ of"):
        load_recipe(mine)


@pytest.mark.parametrize("base", ["3", "{a: b}", "[mae/cpu_tiny, 4]"])
def test_base_of_the_wrong_type(tmp_path: Path, base: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"_base_: {base}\n")
    with pytest.raises(RecipeError, match="_base_: expected a recipe file or a list of them"):
        load_recipe(path)


# --------------------------------------------------------------- resume reads the saved recipe


@pytest.mark.parametrize(
    "saved, expected",
    [
        ("!!python/object/apply:os.system ['true']\n", "invalid YAML"),
        ("- a\n- b\n", "a recipe must be a mapping at the top level"),
        ("train: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 32"),
        ("", "the recipe file is empty"),
    ],
    ids=["tag", "list", "deep", "empty"],
)
def test_resume_reads_the_checkpoint_recipe_like_eval(
    tmp_path: Path, capsys, digits, saved, expected
) -> None:
    """`train` resume, `eval` and `export` read a checkpoint's recipe.yaml through one loader:
    the same one line, exit 2, before any rank starts."""
    tag = tmp_path / "runs/r/checkpoints/step00000004"
    tag.mkdir(parents=True)
    (tag / "recipe.yaml").write_text(saved)
    (tag.parent / "LATEST").write_text(tag.name + "\n")
    path = tmp_path / "r.yaml"
    path.write_text(
        f"{BASE}run: {{name: r, out_dir: {tmp_path / 'runs'}}}\ndata: {{train: {digits['train']}}}\n"
    )
    with pytest.raises(RecipeError) as direct:
        parse_file(tag / "recipe.yaml")
    assert expected in str(direct.value)
    assert main(["train", str(path), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"recipe error: {direct.value} (the checkpoint"), err
    for cmd in (["eval", str(tag.parent.parent)], ["export", str(tag.parent.parent), str(tmp_path / "o.st")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(direct.value) in err, (cmd, err)


# --------------------------------------------------------------- first contact


def test_recipe_summaries_are_whole_sentences() -> None:
    rows = paths.list_recipes()
    assert len(rows) > 40
    for name, text in rows:
        assert text.endswith((".", "!", "?")) and len(text) > 20, (name, text)
    header = ["# MAE ViT-H/14 (He et al., CVPR'22; docs/methods.md §1.3) with", "# a wrapped first sentence.",
              "# 16x16 = 256 tokens.", "# Cost: 1 h"]  # fmt: skip
    assert (
        paths.summary(header)
        == "MAE ViT-H/14 (He et al., CVPR'22; docs/methods.md §1.3) with a wrapped first sentence."
    )
    assert paths.summary(["# No full stop", "# Cost: 1 h"]) == "No full stop"


@pytest.mark.parametrize("recipe, note", [("finetune/cpu_tiny", True), ("finetune/linprobe_cpu_tiny", False)])
def test_linprobe_says_when_it_keeps_a_finetune_optimizer(
    tmp_path: Path, capsys, recipe: str, note: bool
) -> None:
    missing = f"data.train={tmp_path / 'none/manifest.json'}"  # stops at the preflight: nothing trains
    assert main(["linprobe", recipe, missing]) == 2
    err = capsys.readouterr().err
    assert ("optim.optimizer=adamw; MAE's protocol is LARS" in err) == note, err
    assert "data.train: " in err and "does not exist" in err
