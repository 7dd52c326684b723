"""Helpers shared by the target-bank tests (imported by name: tests/targets is on sys.path)."""

from __future__ import annotations

from pathlib import Path

from mimscale.registry import load_recipe

REPO = Path(__file__).resolve().parents[2]


def tiny_recipe(method: str, train: str, *overrides: str):
    """The method's cpu_tiny recipe on ``train`` (MR-MAE: focused mimicking on, the default)."""
    return load_recipe(REPO / f"recipes/{method}/cpu_tiny.yaml", [f"data.train={train}", *overrides])


def tiny_clip_file(path: Path, seed: int) -> Path:
    """Weights of a tiny open_clip CLIP whose vision tower fits the cpu_tiny teacher keys."""
    import open_clip
    import torch

    from mimscale.teachers import TINY_TEXT_CFG

    torch.manual_seed(seed)
    vision = dict(image_size=32, layers=2, width=64, patch_size=4, head_width=16)
    model = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=32, vision_cfg=vision, text_cfg=dict(TINY_TEXT_CFG)
    )
    torch.save(model.state_dict(), path)
    return path
