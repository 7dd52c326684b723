"""`mimscale check RECIPE --nodes N --gpus-per-node G`: the job's shape, or one line refusing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimscale.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards12(tmp_path_factory) -> str:
    """The digits training split as 12 shards of at most 128 samples (1,438 samples)."""
    from mimscale.demo.data import write_digits_shards

    return write_digits_shards(tmp_path_factory.mktemp("d12"), shard_size=128)["train"]


def test_shape_prints_split_accumulation_shards_and_launch_lines(capsys, shards12: str) -> None:
    args = ["mae/cpu_tiny", f"data.train={shards12}", "train.global_batch=128", "train.micro_batch=16",
            "data.num_workers=3"]  # fmt: skip
    assert main(["check", "--nodes", "2", "--gpus-per-node", "2", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "shape: 2 node(s) x 2 rank(s) per node = world size 4"
    assert out[1] == "global batch 128 = micro_batch 16 x 4 ranks x accumulation 2"  # 128 / (16 * 4)
    assert out[2].startswith("data.train: 12 shards, 3.00 per rank, 1.00 per reader (3 worker(s) per rank)")
    assert out[3] == "launch: sbatch --nodes 2 --gpus-per-node 2 slurm/pretrain.sbatch " + " ".join(args)
    assert "--nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d" in out[5]


def test_shape_that_does_not_divide_is_one_line_naming_nodes(capsys, shards12: str) -> None:
    args = ["mae/cpu_tiny", f"data.train={shards12}", "train.global_batch=64", "train.micro_batch=16"]
    assert main(["check", "--nodes", "3", "--gpus-per-node", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "=64 is not divisible by train.micro_batch=16 x world_size=6 (3 nodes x 2 ranks)" in err


def test_too_few_shards_for_nodes_ranks_workers_is_one_line(capsys, shards12: str) -> None:
    args = ["mae/cpu_tiny", f"data.train={shards12}", "data.epoch_mode=exact", "data.num_workers=2",
            "train.global_batch=64", "train.micro_batch=8"]  # fmt: skip
    assert main(["check", "--nodes", "2", "--gpus-per-node", "2", *args]) == 0  # 12 shards, 8 readers
    capsys.readouterr()
    assert main(["check", "--nodes", "4", "--gpus-per-node", "2", *args]) == 2  # 16 readers
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "12 shards for 4 nodes x 2 ranks x 2 workers = 16 readers" in err
