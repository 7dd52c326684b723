"""Every bad recipe is one line naming the file and the key, exit code 2, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimscale.cli import main

REPO = Path(__file__).resolve().parents[1]

GOOD = "optim: {blr: 1.0e-4}\ntrain: {micro_batch: 4, global_batch: 8}\n"

# (overrides, text expected in the one error line): each names the key it is about
CASES = [
    (["optim.lr=-0.1", "optim.blr=null"], "optim.lr: must be > 0"),
    (["optim.blr=-1e-4"], "optim.blr: must be > 0"),
    (["train.micro_batch=0"], "train.micro_batch: must be > 0"),
    (["train.micro_batch=-4"], "train.micro_batch: must be > 0"),
    (["train.global_batch=-8"], "train.global_batch: must be > 0"),
    (["train.ckpt_every=0"], "train.ckpt_every: must be > 0"),
    (["train.epochs=-1"], "train.epochs: must be > 0"),
    (["train.max_steps=0"], "train.max_steps: must be > 0"),
    (["run.name=../elsewhere"], "run.name:"),
    (["source=x.yaml"], "source: unknown key"),
    (["method_cfg=1"], "method_cfg: unknown key"),
    (["extras=1"], "extras: unknown key"),
    (["optim.weight_decy=0.1"], "did you mean optim.weight_decay?"),
    (["teachr.layer=2"], "did you mean teacher?"),
    (["train.micro_batch=3"], "train.global_batch: 8 is not a multiple of train.micro_batch=3"),
]


def check(path: Path, *overrides: str, capsys) -> tuple[int, str]:
    code = main(["check", str(path), *overrides])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("overrides, expected", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_value_is_one_line_naming_file_and_key(tmp_path: Path, capsys, overrides, expected) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    code, err = check(path, *overrides, capsys=capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err


def test_known_keys_name_the_real_sections(tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    _, err = check(path, "nonsense=1", capsys=capsys)
    for section in ("teacher", "mto", "eval", "mae", "train", "optim"):
        assert section in err
    for internal in ("source", "method_cfg", "extras"):
        assert internal not in err.split("known keys")[1]


def test_binary_empty_and_missing_base_files(tmp_path: Path, capsys) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    code, err = check(binary, capsys=capsys)
    assert code == 2 and str(binary) in err and "not a text file" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    code, err = check(empty, capsys=capsys)
    assert code == 2 and "the recipe file is empty" in err and "lr" not in err
    child = tmp_path / "child.yaml"
    child.write_text("_base_: ../nowhere/base.yaml\n" + GOOD)
    code, err = check(child, capsys=capsys)
    assert code == 2 and "nowhere/base.yaml: recipe file not found" in err and str(child) in err


def test_world_size_problems_before_spawning(tmp_path: Path, capsys, digits) -> None:
    """--nproc is known to the CLI: a global batch or an exact epoch it cannot split is refused
    before the launcher starts (no rank prints a traceback)."""
    path = tmp_path / "r.yaml"
    path.write_text(f"_base_: {REPO / 'recipes/mae/cpu_tiny.yaml'}\n")
    code = main(["train", str(path), "--nproc", "3", f"data.train={digits['train']}",
                 "train.micro_batch=4", "train.global_batch=8"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "not divisible by train.micro_batch=4 x world_size=3" in err and str(path) in err
    code = main(["train", str(path), "--nproc", "2", f"data.train={digits['train']}",
                 "data.epoch_mode=exact", "data.num_workers=64"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ranks x 64 workers" in err and not (tmp_path / "runs").exists()
