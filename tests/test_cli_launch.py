"""The launch surface of `mimscale`: recipes by name, `recipes`, `--version`, rendezvous ports,
and the path check that runs before any process is spawned."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from mimscale.cli import free_port, main
from mimscale.config import RecipeError
from mimscale.config.paths import list_recipes, recipe_path, recipes_root
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_recipes_resolve_by_name_and_by_path(tmp_path: Path, monkeypatch) -> None:
    want = (REPO / "recipes/mae/vit_b16.yaml").resolve()
    monkeypatch.chdir(tmp_path)  # outside the repository, as after `pip install .`
    for name in ("mae/vit_b16", "mae/vit_b16.yaml", "recipes/mae/vit_b16.yaml"):
        assert recipe_path(name).resolve() == want
    own = tmp_path / "mine.yaml"
    own.write_text("_base_: " + str(REPO / "recipes/_base/mae.yaml") + "\n")
    assert recipe_path("mine.yaml") == Path("mine.yaml")  # a file here wins over a shipped name


def test_missing_recipe_names_what_was_given_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as e:
        recipe_path("recipes/mae/vit_b61.yaml")
    msg = str(e.value)
    assert msg.startswith("recipes/mae/vit_b61.yaml: recipe not found") and "recipes/recipes" not in msg
    assert "mimscale recipes" in msg


def test_recipes_lists_every_shipped_recipe_with_its_summary(capsys) -> None:
    rows = dict(list_recipes())
    files = [
        p
        for p in recipes_root().rglob("*.yaml")
        if not p.relative_to(recipes_root()).parts[0].startswith("_")
    ]
    assert len(rows) == len(files) and "mae/vit_b16" in rows and "_base/mae" not in rows
    assert rows["mae/vit_b16"].startswith("MAE")
    assert main(["recipes"]) == 0
    assert "mae/cpu_tiny" in capsys.readouterr().out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("mimscale 0.")


def test_free_port_is_free_and_not_a_fixed_default() -> None:
    ports = {free_port() for _ in range(5)}
    assert 29500 not in ports and len(ports) > 1
    with socket.socket() as s:
        s.bind(("", ports.pop()))  # nobody holds it


def test_train_refuses_missing_data_before_spawning(tmp_path: Path, capsys) -> None:
    # --nproc 2 would start the deepspeed launcher: the path check must stop it first, in one line
    rc = main(["train", "mae/cpu_tiny", "--nproc", "2", f"data.train={tmp_path}/none/manifest.json"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.train:" in err and f"{tmp_path}/none/manifest.json does not exist" in err
    assert "mimscale prep-shards" in err and "Traceback" not in err


def test_placeholder_paths_and_missing_teacher_file_are_named(tmp_path: Path) -> None:
    from mimscale.preflight import data_problems, teacher_problems

    r = load_recipe(REPO / "recipes/mae/vit_b16.yaml")
    assert [p.split(":")[0] for p in data_problems(r)] == ["data.train"]
    r = load_recipe(REPO / "recipes/mr_mae/cpu_tiny.yaml", [
        f"data.train={tmp_path}", "teacher.allow_random=false", f"teacher.pretrained={tmp_path}/clip.pt"
    ])  # fmt: skip
    (problem,) = teacher_problems(r)
    assert problem.startswith("teacher.pretrained:") and f"{tmp_path}/clip.pt" in problem


def test_installed_command_reports_version() -> None:
    out = subprocess.run(
        ["python", "-m", "mimscale.cli", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and out.stdout.startswith("mimscale ")


def test_nproc_launch_gets_its_own_port(tmp_path: Path, monkeypatch) -> None:
    """Two `mimscale train --nproc N` on one node must not share the launcher's default port."""
    import mimscale.cli as cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "launch", lambda cmd: calls.append(cmd) or 0)
    data, out = f"data.train={tmp_path}", f"run.out_dir={tmp_path}"  # the command locks out_dir/name
    assert main(["train", "mae/cpu_tiny", "--nproc", "2", out, data]) == 0
    assert main(["train", "mae/cpu_tiny", "--nproc", "2", out, data]) == 0
    assert main(["train", "mae/cpu_tiny", "--nproc", "2", "--master-port", "29611", out, data]) == 0
    assert main(["train", "mae/cpu_tiny", "--nproc", "2", "--launcher", "torchrun", out, data]) == 0
    ports = [next(a for a in c if a.startswith("--master_port=")) for c in calls[:3]]
    assert ports[0] != ports[1] and "--master_port=29500" not in ports and ports[2] == "--master_port=29611"
    assert "--standalone" in calls[3]  # torchrun binds a free port itself
    for c in calls:
        assert c[c.index("--module") + 1] == "mimscale.train" and c[-1] == data


# A stand-in launcher that reports 1 for any failed rank (as torchrun does) and dies of SIGUSR1
# (as the deepspeed launcher does): what it does with a signal must not decide the outcome.
LAUNCHER = r"""
import signal, subprocess, sys
def heard(signum, frame):
    open(sys.argv[1] + ".launcher", "w").write(signal.Signals(signum).name)
signal.signal(signal.SIGTERM, heard)
rank = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]])
sys.exit(1 if rank.wait() else 0)
"""
# A stand-in rank: stops when the stop file appears, records 75 as rank 0 does, exits 75.
RANK = r"""
import os, sys, time
open(sys.argv[1] + ".ready", "w").close()
stop = os.environ["MIMSCALE_STOP_FILE"]
while not os.path.exists(stop):
    time.sleep(0.05)
open(sys.argv[1], "w").write(open(stop).read())
from mimscale.engine.rundir import write_status
sys.exit(write_status(75))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_launch_asks_the_ranks_to_stop_and_returns_their_status(tmp_path: Path, sig: str) -> None:
    """`mimscale train --nproc N` signalled: the ranks are asked through the stop file (the
    launcher hears nothing) and the command exits with the ranks' 75, not the launcher's 1
    (was: 241 / 246 from a launcher killed by the signal, and 1 under torchrun)."""
    import signal
    import sys
    import time

    out = str(tmp_path / "rank")
    outer = "import sys; from mimscale.cli import launch; sys.exit(launch(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "MIMSCALE_STOP_FILE"}
    cmd = [sys.executable, "-c", outer, sys.executable, "-c", LAUNCHER, out, RANK]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    deadline = time.time() + 60
    while not Path(out + ".ready").exists():
        assert time.time() < deadline and proc.poll() is None, "the launched processes did not start"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=60) == 75  # the ranks' status, not the launcher's
    assert Path(out).read_text() == f"{sig} to mimscale train\n"  # the reason reaches the ranks
    assert not Path(out + ".launcher").exists()


def test_output_piped_into_head_is_no_error() -> None:
    """`mimscale recipes | head -1` ends quietly (was a BrokenPipeError traceback)."""
    import subprocess
    import sys

    code = "import sys; from mimscale.cli import main; sys.exit(main(['recipes']))"
    for _ in range(5):  # whether the reader leaves before the last write is a race: try a few times
        out = subprocess.run(
            f'{sys.executable} -c "{code}" | head -1', shell=True, capture_output=True, text=True, check=True
        )
        assert out.stdout.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
