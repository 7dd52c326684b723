"""A manifest that lies (total, counts, names) or lists a shard that is not there is refused by
``mimscale check`` and by the preflight of every epoch mode: one line naming the manifest entry
or the shard, exit 2, before anything starts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mimscale.cli import main as cli_main
from mimscale.config import RecipeError
from mimscale.preflight import check_paths
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes/mae/cpu_tiny.yaml"
SHARD = "digits-train-000002.tar"


def _entry(m: dict) -> dict:
    return next(s for s in m["shards"] if s["name"] == SHARD)


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))

    return apply


def _set_count(value: object, keep_total: bool = False) -> Callable[[Path], None]:
    def change(m: dict) -> None:
        old = _entry(m)["count"]
        _entry(m)["count"] = value
        if not keep_total and isinstance(value, int):
            m["total"] += value - old

    return _edit(change)


def _grow(folder: Path) -> None:
    with open(folder / SHARD, "ab") as f:
        f.write(b"\0" * 1024)


# case -> (how the copy is damaged, what the one line says)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "total disagrees with the counts": (_edit(lambda m: m.update(total=m["total"] + 7)), "counts sum to"),
    "a listed shard is missing": (lambda f: (f / SHARD).unlink(), f"{SHARD}: listed in"),
    "a zero count": (_set_count(0), "count 0 is not a positive integer"),
    "a negative count": (_set_count(-3), "count -3 is not a positive integer"),
    "a count that is a string": (_set_count("12"), "count '12' is not a positive integer"),
    "a name outside the folder": (
        _edit(lambda m: _entry(m).update(name="../" + SHARD)),
        "the name must be a shard file name",
    ),
    "a shard of another size": (_grow, "bytes, the manifest says"),
    "not JSON": (lambda f: (f / "manifest.json").write_text("{ nope"), "unreadable shard manifest"),
}


def _damaged_copy(digits: dict, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "train"
    shutil.copytree(Path(digits["train"]).parent, folder)
    CASES[case][0](folder)
    return folder / "manifest.json"


def _overrides(manifest: Path, digits: dict, mode: str) -> list[str]:
    return [f"data.train={manifest}", f"data.val={digits['val']}", f"data.epoch_mode={mode}"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["resampled", "exact"])
def test_preflight_refuses_a_lying_manifest_in_every_epoch_mode(
    digits: dict, tmp_path: Path, case: str, mode: str
) -> None:
    manifest = _damaged_copy(digits, tmp_path, case)
    recipe = load_recipe(RECIPE, _overrides(manifest, digits, mode))
    with pytest.raises(RecipeError) as info:
        check_paths(recipe, world_size=2)
    lines = str(info.value).splitlines()
    said = [x for x in lines if CASES[case][1] in x]
    assert len(said) == 1 and "data.train:" in said[0], str(info.value)
    assert "readers" not in str(info.value)  # the exact layout is not judged on a broken manifest


@pytest.mark.parametrize("case", list(CASES))
def test_mimscale_check_exits_2_naming_the_problem(digits: dict, tmp_path: Path, case: str, capsys) -> None:
    manifest = _damaged_copy(digits, tmp_path, case)
    rc = cli_main(["check", str(RECIPE), *_overrides(manifest, digits, "resampled")])
    err = capsys.readouterr().err
    assert rc == 2 and CASES[case][1] in err and "Traceback" not in err


def test_a_sound_manifest_passes(digits: dict, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    shutil.copytree(Path(digits["train"]).parent, folder)
    for mode in ("resampled", "exact"):
        recipe = load_recipe(RECIPE, _overrides(folder / "manifest.json", digits, mode))
        check_paths(recipe, world_size=2)
