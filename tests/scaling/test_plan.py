"""``mimscale plan``: the numbers it prints follow from the memory model and the stated MFU."""

from __future__ import annotations

import json

import pytest

from mimscale.cli import main
from mimscale.config.paths import recipe_path
from mimscale.registry import load_recipe
from mimscale.scaling import memory, plan


def run_plan(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_is_consistent(capsys) -> None:
    out = run_plan(capsys, "mae/vit_b16", "train.epochs=1", "--gpus", "8", "--gpu-mem", "40",
                   "--gpu-tflops", "312", "--mfu", "0.5")  # fmt: skip
    r = load_recipe(recipe_path("mae/vit_b16"), ["train.epochs=1"])
    c = memory.count_params(r)
    assert out["params"]["trainable"] == c.trainable > 80e6  # ViT-B encoder + MAE decoder
    gb, images = r.train.global_batch, out["images"]
    for s in out["settings"]:
        assert s["micro_batch"] * s["grad_accum"] * 8 == gb
        mem = memory.estimate(r, c, s["zero_stage"], 8, s["micro_batch"], s["activation_checkpointing"], True)
        assert s["memory_gib"]["total"] == pytest.approx(mem.total / 2**30)
        assert s["fits"] == (s["memory_gib"]["total"] <= 40 * plan.USABLE - plan.RESERVE_GIB)
    # GPU-hours by hand for the fastest kind of setting (no checkpointing, ZeRO <= 2, micro >= 32)
    flops = out["train_flops_per_image"]
    hours = images * flops / (312e12 * 0.5) / 3600
    rec = out["recommended"]
    assert rec["fits"] and not rec["activation_checkpointing"] and rec["zero_stage"] < 3
    assert rec["gpu_hours"] == pytest.approx(hours)
    assert f"train.micro_batch={rec['micro_batch']}" in out["launch"]
    assert out["launch"].startswith("sbatch --nodes 1 --gpus-per-node 8 slurm/pretrain.sbatch mae/vit_b16")
    assert any("MFU 0.50 (--mfu)" in a for a in out["assumptions"])


def test_momentum_methods_are_not_offered_zero3(capsys) -> None:
    out = run_plan(capsys, "lc_mae/vit_b16", "--gpus", "8", "--gpu", "H100")
    assert {s["zero_stage"] for s in out["settings"]} == {0, 1, 2}
    assert out["params"]["momentum"] > 80e6  # the fp32 momentum encoder + projector is counted


def test_a_method_without_its_own_flop_count_is_counted_from_its_blocks(capsys) -> None:
    """CAE v2 gives no train_flops_per_image: the plan counts its blocks and its online teacher."""
    from mimscale.models.flops import block_flops

    out = run_plan(capsys, "cae_v2/vit_b16", "--gpus", "8", "--gpu", "H100")
    enc = 12 * block_flops(98 + 1, 768)  # 196 patches, 98 masked (block mask, ratio 0.5)
    regressor = 0.0  # cae_v2/vit_b16 supervises cls + visible only: no regressor is built
    teacher = 12 * block_flops(197, 768)  # CLIP ViT-B/16, forward only
    assert "teacher" in out["train_flops_source"]
    assert out["train_flops_per_image"] == pytest.approx(3 * (enc + regressor) + teacher)
    assert out["params"]["teacher"] > 80e6


def test_nothing_fits_says_so(capsys) -> None:
    assert main(["plan", "mae/vit_h14", "--gpus", "1", "--gpu-mem", "4", "--gpu-tflops", "100"]) == 0
    text = capsys.readouterr().out
    assert "nothing fits" in text and "assumption: MFU 0.35 (assumed)" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--gpus", "8", "--gpu", "B300"], "--gpu: unknown GPU 'B300'"),
        (["--gpus", "8", "--gpu-mem", "80"], "--gpu-mem and --gpu-tflops"),
        (["--gpus", "3"], "does not split over 3 GPUs"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv: list[str], needle: str) -> None:
    assert main(["plan", "mae/vit_b16", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
