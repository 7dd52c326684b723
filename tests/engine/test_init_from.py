"""``model.init_from``: a fresh run starts from an imported official checkpoint's weights."""

from __future__ import annotations

from pathlib import Path

import torch
from launch import REPO, python, run_cmd

from mimscale.eval.ckpt import method_state_dict
from mimscale.eval.import_weights import import_weights

RECIPE = REPO / "recipes/mae/cpu_tiny.yaml"


def test_training_starts_from_imported_weights(digits, tmp_path: Path) -> None:
    from mimscale.methods import build_method
    from mimscale.registry import load_recipe

    torch.manual_seed(123)  # weights no seeded fresh build would reproduce
    ref = build_method(load_recipe(RECIPE, []))
    official = {
        k.replace("encoder.vit.", ""): v for k, v in ref.state_dict().items() if k.startswith("encoder.")
    }
    file = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official}, file)  # an encoder-only release, as MAE's pre-trained files
    import_weights(file, "mae", RECIPE, tmp_path / "imported")
    args = [
        f"data.train={digits['train']}", f"run.out_dir={tmp_path}", "run.name=cont", "train.max_steps=1",
        "train.global_batch=32", "train.micro_batch=32", "data.num_workers=0", "optim.blr=1e-12",
        f"model.init_from={tmp_path / 'imported'}",
    ]  # fmt: skip
    run_cmd([python(), "-m", "mimscale.train", str(RECIPE), *args])
    # lr ~0: the one step leaves the weights where init_from put them (a fresh init is ~0.02 away)
    got = method_state_dict(tmp_path / "cont")
    for k, v in ref.state_dict().items():
        if k.startswith("encoder."):
            assert torch.allclose(got[k], v, atol=1e-8), k
