"""The frozen teacher's tower reproduces timm's own forward, with and without the [CLS] attention."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from mimscale.models.teacher_vit import TeacherViT


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=0
    ).eval()


def test_timm_tower_equals_forward_features() -> None:
    vit = tiny_vit()
    tower = TeacherViT.from_timm(vit, layer=2, norm=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = vit.forward_features(x)  # [B, 1 + N, C], final norm applied
        out = tower(x)
        with_attn = tower(x, cls_attn=True)
    torch.testing.assert_close(out.tokens, ref, rtol=0, atol=1e-5)
    # the explicit-softmax path of the last block gives the same tokens as the fused one
    torch.testing.assert_close(with_attn.tokens, ref, rtol=0, atol=1e-5)
    attn = with_attn.cls_attn
    assert attn.shape == (2, 16) and torch.allclose(attn.sum(dim=-1), torch.ones(2))


def test_layer_cut_runs_that_many_blocks() -> None:
    vit = tiny_vit()
    tower = TeacherViT.from_timm(vit, layer=1, norm=False).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        h = vit.patch_embed(x)
        h = torch.cat([vit.cls_token.expand(1, -1, -1), h], dim=1) + vit.pos_embed
        ref = vit.blocks[0](vit.norm_pre(h))
        torch.testing.assert_close(tower(x).tokens, ref, rtol=0, atol=1e-5)
