"""Export -> timm strict load -> identical features; checkpoint resolution; fine-tune init from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimscale.config import save_recipe
from mimscale.methods import build_method
from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def fake_stage0_checkpoint(tmp_path: Path, recipe_file: str, *overrides: str):
    """A run dir laid out as the engine writes it, with DeepSpeed's stage-0 model-states file."""
    r = load_recipe(REPO / recipe_file, list(overrides))
    torch.manual_seed(0)
    method = build_method(r)
    with torch.no_grad():  # make every weight distinctive (init leaves LayerNorms at 1 / 0)
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tag = tmp_path / "run/checkpoints/step00000007"
    tag.mkdir(parents=True)
    torch.save({"module": method.state_dict()}, tag / "mp_rank_00_model_states.pt")
    save_recipe(r, tag / "recipe.yaml")
    (tag.parent / "LATEST").write_text("step00000007\n")
    return tmp_path / "run", method.eval(), r


@pytest.mark.parametrize(
    "recipe_file, overrides",
    [
        ("recipes/mae/cpu_tiny.yaml", ()),
        ("recipes/simmim/cpu_tiny.yaml", ()),  # BEiT arch, shared relative position bias, mask token
    ],
)
def test_export_loads_strictly_in_timm_with_identical_features(tmp_path, recipe_file, overrides) -> None:
    from safetensors import safe_open

    from mimscale.eval.export import export_encoder, load_exported, main

    run, method, r = fake_stage0_checkpoint(tmp_path, recipe_file, *overrides)
    out = tmp_path / "enc.safetensors"
    assert main([str(run), str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert not any("mask_token" in k for k in f.keys())
    x = torch.randn(2, 3, r.model.img_size, r.model.img_size)
    want = method.encoder(x).x
    for overlay in (True, False):  # timm's pretrained_cfg_overlay loader, and a plain strict load
        model = load_exported(out, pretrained_overlay=overlay).eval()
        assert torch.equal(model.forward_features(x), want)
    # The documented call: timm.create_model(name, pretrained=True, overlay, **timm_kwargs).
    import timm

    model = timm.create_model(
        meta["timm_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out), num_classes=0),
        **meta["timm_kwargs"],
    ).eval()
    assert torch.equal(model.forward_features(x), want)
    assert meta == export_encoder(run / "checkpoints/step00000007", tmp_path / "again.safetensors")


def test_default_vit_b16_loads_with_the_plain_documented_call(tmp_path) -> None:
    """ViT-B/16 at 224 with default shapes: no kwargs needed, exactly as the README says."""
    import timm
    from safetensors.torch import save_file

    from mimscale.config import ModelConfig
    from mimscale.models.vit import ViTEncoder

    enc = ViTEncoder(ModelConfig(size="base")).eval()
    out = tmp_path / "b16.safetensors"
    save_file({k: v.contiguous() for k, v in enc.vit.state_dict().items()}, str(out))
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=0)
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(model.forward_features(x), enc(x).x, atol=1e-5)


def test_checkpoint_resolution_and_errors(tmp_path) -> None:
    from mimscale.eval.ckpt import resolve_checkpoint
    from mimscale.eval.runs import load_method

    run, method, _ = fake_stage0_checkpoint(tmp_path, "recipes/mae/cpu_tiny.yaml")
    want = (run / "checkpoints", "step00000007")
    assert resolve_checkpoint(run) == want
    assert resolve_checkpoint(run / "checkpoints") == want
    assert resolve_checkpoint(run / "checkpoints/step00000007") == want
    with pytest.raises(FileNotFoundError, match="not a mimscale checkpoint"):
        resolve_checkpoint(tmp_path)
    loaded, _ = load_method(run)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), method.state_dict().values(), strict=True)
    )


def test_finetune_initialises_from_checkpoint_and_export(tmp_path) -> None:
    from mimscale.eval.export import export_encoder

    run, method, _ = fake_stage0_checkpoint(tmp_path, "recipes/mae/cpu_tiny.yaml")
    export_encoder(run, tmp_path / "enc.safetensors")
    for source in (str(run), str(tmp_path / "enc.safetensors")):
        r = load_recipe(REPO / "recipes/finetune/cpu_tiny.yaml", [f"finetune.pretrained={source}"])
        ft = build_method(r)
        for k, v in method.encoder.vit.state_dict().items():
            assert torch.equal(ft.encoder.vit.state_dict()[k], v), k
    bad = load_recipe(
        REPO / "recipes/finetune/cpu_tiny.yaml", [f"finetune.pretrained={run}", "model.depth=2"]
    )
    with pytest.raises(Exception, match="does not match model"):
        build_method(bad)


@pytest.mark.parametrize(
    "recipe_file, overrides, pool",
    [
        ("recipes/mae/cpu_tiny.yaml", (), "token"),
        ("recipes/mae/cpu_tiny.yaml", ("eval.pool=mean",), "avg"),
        ("recipes/simmim/cpu_tiny.yaml", (), "token"),
    ],
)
def test_pretrained_cfg_gives_mimscale_eval_preprocessing(tmp_path, recipe_file, overrides, pool) -> None:
    import stat

    import timm

    from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD
    from mimscale.eval.export import export_encoder, load_exported
    from mimscale.eval.features import encode

    run, method, r = fake_stage0_checkpoint(tmp_path, recipe_file, *overrides)
    out, hf = tmp_path / "enc.safetensors", tmp_path / "hf"
    meta = export_encoder(run, out, hf_dir=hf)
    size = r.model.img_size
    want = {
        "input_size": (3, size, size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": r.data.views[0].interpolation,
    }
    x = torch.randn(2, 3, size, size)
    probe = "mean" if "eval.pool=mean" in overrides else "cls"
    assert meta["pool"] == probe and meta["timm_kwargs"]["global_pool"] == pool
    for model in (
        load_exported(out),
        load_exported(out, pretrained_overlay=False),
        timm.create_model(f"local-dir:{hf}", pretrained=True),  # the Hugging Face layout
    ):
        cfg = timm.data.resolve_model_data_config(model)
        got = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items() if k in want}
        assert got == {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in want.items()}
        with torch.no_grad():
            # the pooled features are the ones the run was probed with
            assert torch.allclose(model.eval()(x), encode(method.encoder, x, probe), atol=1e-6)
    assert {p.name for p in hf.iterdir()} >= {"config.json", "model.safetensors"}
    for f in [out, *hf.iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
