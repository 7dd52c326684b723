"""The `mimscale` command routes subcommands, including those that own their flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mimscale.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_prep_shards_flags_reach_the_tool(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.full((12, 16, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "src" / cls / f"{i}.png")
    rc = main(["prep-shards", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
               "--shard-size", "4", "--no-progress", "--workers", "1"])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["out-000000.tar", "out-000001.tar"]
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_check_prints_resolved_recipe_and_rejects_typos(capsys, tmp_path: Path) -> None:
    data = f"data.train={tmp_path}"  # the recipe's placeholder path would fail the path check
    assert main(["check", str(REPO / "recipes/mae/vit_b16.yaml"), "optim.blr=2e-4", data]) == 0
    assert "blr: 0.0002" in capsys.readouterr().out
    assert main(["check", str(REPO / "recipes/mae/vit_b16.yaml"), "optim.blrr=2e-4"]) == 2
    assert "optim.blrr: unknown key" in capsys.readouterr().err
