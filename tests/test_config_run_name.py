"""``run.name`` is one directory under ``run.out_dir``: names that would leave it are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimscale.config import RecipeError
from mimscale.registry import load_recipe


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "a\\b", "..", ".", "x..y"])
def test_run_name_with_path_parts_is_refused(tmp_path: Path, name: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("method: mae\noptim: {blr: 1.0e-4}\n")
    with pytest.raises(RecipeError, match=r"run\.name: .* must be a plain directory name") as e:
        load_recipe(p, [f"run.name={name}"])
    assert str(p) in str(e.value)


def test_plain_run_names_pass(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("method: mae\noptim: {blr: 1.0e-4}\n")
    for name in ("mae_vit_b16", "run-2.1", ".hidden"):
        assert load_recipe(p, [f"run.name={name}"]).run.name == name
