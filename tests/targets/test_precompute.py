"""Writing a bank: 2 processes write the same bytes as 1, an interrupted run resumes to identical
shards (partial files never count as complete), and the CLI path works end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bank_helpers import REPO, tiny_recipe

from mimscale.targets.precompute import Precompute

ARGS = ["--views", "2", "--encoding", "int8", "--batch", "32"]


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# A resumed bank, in a fresh process: which shards it found complete, which it wrote.
RESUME = """
import json, sys
from bank_helpers import tiny_recipe
from mimscale.targets.precompute import Precompute
job = Precompute(tiny_recipe("cae_v2", sys.argv[1]), sys.argv[2], views=2, encoding="int8", batch=32)
print(json.dumps({"done": [job.shard_done(i) for i in range(4)], "ran": job.run()}))
"""


def env(extra: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = os.pathsep.join([str(REPO), str(Path(__file__).parent)])  # bank_helpers for RESUME
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(extra or {})}


def cli(train: str, out: Path, extra: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "data_prep/precompute_targets.py", str(REPO / "recipes/cae_v2/cpu_tiny.yaml"),
           f"data.train={train}", "--out", str(out), *ARGS]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO, env=env(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


def test_two_processes_equal_one_and_an_interrupted_run_resumes_identically(small_digits, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    wait(cli(small_digits, one))
    wait(*(cli(small_digits, two, {"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)))
    ref = files(one)
    assert "manifest.json" in ref and sum(n.endswith(".tgt") for n in ref) == 4
    assert files(two) == ref

    # Interrupt: the manifest not yet written, shard 1 killed mid-write (a .partial, no final
    # file), shard 2 renamed but its completion record never written, shard 3 truncated.
    cut = tmp_path / "cut"
    shutil.copytree(one, cut)
    (cut / "manifest.json").unlink()
    names = sorted(n for n in ref if n.endswith(".tgt"))
    (cut / names[1]).rename(cut / (names[1] + ".partial"))
    (cut / (names[1] + ".json")).unlink()
    (cut / (names[2] + ".json")).unlink()
    data = (cut / names[3]).read_bytes()
    (cut / names[3]).write_bytes(data[: len(data) // 2])
    # The resume runs in a process of its own, as the reference did: the bytes are equal for the
    # same float arithmetic, which this test process need not have after the suite's earlier
    # tests (in CI, the suite's process wrote last bits of its own; this same test alone did not).
    out = subprocess.run([sys.executable, "-c", RESUME, small_digits, str(cut)], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed == {"done": [True, False, False, False], "ran": [1, 2, 3]}  # only the missing ones
    got = files(cut)
    assert {n: b for n, b in got.items() if not n.endswith(".partial")} == ref
    job = Precompute(tiny_recipe("cae_v2", small_digits), cut, views=2, encoding="int8", batch=32)
    assert job.run() == []  # complete: nothing to do
    # a rerun with another config never mixes its shards into this bank
    with pytest.raises(ValueError, match=r"another encoding \('int8', now 'fp16'\); use a new --out"):
        Precompute(tiny_recipe("cae_v2", small_digits), cut, views=2, encoding="fp16", batch=32).run()


def test_pca_basis_file_is_written_once(tmp_path) -> None:
    """Array tasks fit the basis concurrently: the first file stays, later ones never replace it."""
    from mimscale.targets.precompute import _write_once

    _write_once(tmp_path / "pca.json", "first")
    _write_once(tmp_path / "pca.json", "second")
    assert (tmp_path / "pca.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["pca.json"]  # no temporary file left behind
