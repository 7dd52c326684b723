"""ViTEncoder: token modes, hidden-state indexing, timm key compatibility, MAE init, lr-decay ids."""

import math

import pytest
import timm
import torch
from torch import nn

from mimscale.config import ModelConfig
from mimscale.models.pos_embed import mae_sincos_pos_embed
from mimscale.models.vit import SIZES, ViTEncoder, visible_ids


def tiny(**kw) -> ModelConfig:
    base = dict(size="tiny", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    return ModelConfig(**{**base, **kw})


def simmim_tiny() -> ModelConfig:
    return tiny(arch="beit", abs_pos="none", rel_pos_bias="shared", layer_scale=0.1, drop_path=0.1)


def equal_mask(b: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(b, n, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(b, n, dtype=torch.bool).scatter_(1, ids, True)


@pytest.mark.parametrize("size", list(SIZES))
def test_sizes_and_heads(size):
    dim, depth, heads = SIZES[size]
    patch = 14 if size == "huge" else 16
    enc = ViTEncoder(ModelConfig(size=size, depth=1, img_size=2 * patch, patch_size=patch))
    assert (enc.embed_dim, enc.num_heads, enc.depth) == (dim, heads, 1)
    assert enc.vit.blocks[0].attn.num_heads == heads
    assert {"tiny": 12, "small": 6}.get(size, heads) == heads  # ViT-T 12 heads (CAE v2 / MAE-lite)
    assert (
        ViTEncoder(ModelConfig(size=size, depth=1, num_heads=1, img_size=patch, patch_size=patch)).num_heads
        == 1
    )


@pytest.mark.parametrize("cfg", [tiny(), tiny(layer_scale=0.1), simmim_tiny(), tiny(arch="beit")])
def test_state_dict_loads_into_timm_and_matches_its_forward(cfg):
    enc = ViTEncoder(cfg).eval()
    ref = timm.create_model(enc.timm_name, pretrained=False, **enc.timm_kwargs).eval()
    ref.load_state_dict(enc.vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x).x, ref.forward_features(x), atol=1e-5)


def test_vit_structure_and_fixed_pos():
    enc = ViTEncoder(tiny(layer_scale=0.1, drop_path=0.1))
    assert enc.grid == (8, 8) and enc.num_patches == 64
    assert not enc.vit.pos_embed.requires_grad
    assert torch.equal(enc.vit.pos_embed[0], mae_sincos_pos_embed(64, 8))
    assert enc.vit.norm.eps == 1e-6 and enc.vit.blocks[0].norm1.eps == 1e-6
    assert enc.vit.blocks[0].attn.qkv.bias is not None
    assert torch.allclose(enc.vit.blocks[0].ls1.gamma, torch.full((64,), 0.1))
    assert enc.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    beit = ViTEncoder(simmim_tiny(), mask_token=True)
    assert beit.vit.pos_embed is None and beit.vit.rel_pos_bias is not None
    assert (
        beit.vit.blocks[0].attn.q_bias is not None and beit.vit.blocks[0].attn.k_bias.requires_grad is False
    )


def test_mae_init_stats():
    enc = ViTEncoder(ModelConfig(size="tiny", depth=2, img_size=64))  # D = 192
    assert enc.vit.cls_token.std().item() == pytest.approx(0.02, rel=0.25)
    for name, m in enc.named_modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound + 1e-6, name
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
            assert torch.all(m.bias == 0), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    w = enc.vit.patch_embed.proj.weight
    assert w.abs().max() <= math.sqrt(6.0 / (w[0].numel() + w.shape[0])) + 1e-6


def test_visible_mode_equals_timm_blocks_on_gathered_tokens():
    enc = ViTEncoder(tiny()).eval()
    x, mask = torch.randn(3, 3, 32, 32), equal_mask(3, 64, 48)
    out = enc(x, mask, mode="visible", return_layers=[0])
    with torch.no_grad():
        tokens = enc.vit.patch_embed(x) + enc.vit.pos_embed[:, 1:]
        kept = torch.stack([tokens[b][~mask[b]] for b in range(3)])  # [B, 16, D], raster order
        cls = (enc.vit.cls_token + enc.vit.pos_embed[:, :1]).expand(3, -1, -1)
        seq = torch.cat([cls, kept], dim=1)
        ref = enc.vit.norm(enc.vit.blocks(seq))
    assert out.x.shape == (3, 17, 64)
    assert torch.allclose(out.hidden[0], seq) and torch.allclose(out.x, ref, atol=1e-6)


def test_mask_token_mode_substitutes_exactly_masked_positions():
    enc = ViTEncoder(simmim_tiny(), mask_token=True).eval()
    x, mask = torch.randn(2, 3, 32, 32), equal_mask(2, 64, 20)
    mask[1, :5] = True  # unequal counts are fine with mask tokens
    layer0 = enc(x, mask, mode="mask_token", return_layers=[0]).hidden[0]
    patches = enc.vit.patch_embed(x)
    assert torch.allclose(layer0[:, 0], enc.vit.cls_token[0].expand(2, -1))
    assert torch.allclose(layer0[:, 1:][mask], enc.mask_token[0].expand(int(mask.sum()), -1))
    assert torch.allclose(layer0[:, 1:][~mask], patches[~mask])


def test_hidden_state_layer_indexing():
    enc = ViTEncoder(tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = enc(x, return_layers=[4, 0, 2])
    with torch.no_grad():
        h0 = torch.cat([(enc.vit.cls_token + enc.vit.pos_embed[:, :1]).expand(2, -1, -1),
                        enc.vit.patch_embed(x) + enc.vit.pos_embed[:, 1:]], dim=1)  # fmt: skip
        h2 = enc.vit.blocks[1](enc.vit.blocks[0](h0))
        h4 = enc.vit.blocks[3](enc.vit.blocks[2](h2))
    for got, want in zip(out.hidden, [h4, h0, h2], strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(out.x, enc.vit.norm(h4), atol=1e-6)
    with pytest.raises(ValueError, match="return_layers"):
        enc(x, return_layers=[5])


def test_unequal_masked_counts_give_clear_error():
    mask = equal_mask(2, 64, 48)
    mask[0, ~mask[0]] = torch.tensor([True] + [False] * 15)  # sample 0 now masks 49
    with pytest.raises(ValueError, match="same number of masked patches.*48 to 49"):
        ViTEncoder(tiny())(torch.randn(2, 3, 32, 32), mask, mode="visible")
    assert torch.equal(visible_ids(torch.tensor([[True, False, False, True]])), torch.tensor([[1, 2]]))


def test_mode_argument_errors():
    enc, x, mask = ViTEncoder(tiny()), torch.randn(1, 3, 32, 32), equal_mask(1, 64, 8)
    with pytest.raises(ValueError, match="takes no mask"):
        enc(x, mask)
    with pytest.raises(ValueError, match="needs a mask"):
        enc(x, mode="visible")
    with pytest.raises(ValueError, match="mask_token=True"):
        enc(x, mask, mode="mask_token")
    with pytest.raises(ValueError, match="bool"):
        enc(x, mask.float(), mode="visible")
    with pytest.raises(ValueError, match="relative position bias"):
        ViTEncoder(simmim_tiny())(x, mask, mode="visible")


@pytest.mark.parametrize("cfg", [tiny(drop_path=0.2), simmim_tiny()])
def test_grad_checkpointing_matches(cfg):
    x, mask = torch.randn(2, 3, 32, 32), equal_mask(2, 64, 30)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = ViTEncoder(cfg, mask_token=True)
        enc.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)  # same drop-path draws
        out = enc(x, mask, mode="mask_token", return_layers=[2])
        (out.x.square().mean() + out.hidden[0].mean()).backward()
        results.append((out.x, [p.grad for p in enc.parameters() if p.requires_grad]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_layer_ids_follow_mae_lr_decay_and_timm_grouping():
    from timm.optim import param_groups_layer_decay

    enc = ViTEncoder(simmim_tiny(), mask_token=True)
    assert enc.layer_id("mask_token") == enc.layer_id("vit.cls_token") == 0
    assert enc.layer_id("vit.patch_embed.proj.weight") == 0
    assert enc.layer_id("vit.blocks.0.attn.qkv.weight") == 1 and enc.layer_id("vit.blocks.3.norm1.bias") == 4
    assert (
        enc.layer_id("vit.norm.weight") == enc.layer_id("vit.rel_pos_bias.relative_position_bias_table") == 5
    )
    wrapper = nn.Module()
    wrapper.encoder, wrapper.head = enc, nn.Linear(64, 2)
    wrapper.group_matcher = lambda coarse=False: enc.group_matcher(coarse, prefix="encoder.")
    groups = param_groups_layer_decay(wrapper, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in wrapper.named_parameters():
        lid = enc.layer_id(name[len("encoder.") :]) if name.startswith("encoder.") else enc.depth + 1
        assert scale_of[id(p)] == pytest.approx(0.5 ** (enc.depth + 1 - lid)), name
    assert enc.no_weight_decay() == {
        "vit.cls_token",
        "mask_token",
        "vit.rel_pos_bias.relative_position_bias_table",
    }
