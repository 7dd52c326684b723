"""Frozen teachers: features, grid matching, weights resolution, renormalisation, [CLS] attention,
the offloaded (ZeRO-Inference) teacher. Real open_clip / timm models with small random weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimscale.config import RecipeError
from mimscale.registry import load_recipe
from mimscale.teachers import TINY_TEXT_CFG, TeacherConfig, build_provider, teacher_image_size

REPO = Path(__file__).resolve().parents[1]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TINY = {"width": 64, "depth": 2, "heads": 4, "patch_size": 4, "out_dim": 32}


def tiny_clip(img_size: int = 32):
    """A full tiny open_clip CLIP whose vision tower matches the ``TINY`` overrides."""
    import open_clip

    torch.manual_seed(0)
    vision = dict(image_size=img_size, layers=2, width=64, patch_size=4, head_width=16)
    return open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=32, vision_cfg=vision, text_cfg=dict(TINY_TEXT_CFG)
    ).eval()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_clip()
    path = tmp_path_factory.mktemp("w") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path, model


def recipe(method: str = "cae_v2", *overrides: str):
    return load_recipe(REPO / "recipes" / method / "cpu_tiny.yaml", list(overrides))


def file_recipe(path: Path, *overrides: str, method: str = "cae_v2"):
    return recipe(method, f"teacher.pretrained={path}", "teacher.allow_random=false", *overrides)


def views(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def test_import_is_light() -> None:
    code = (
        "import sys, mimscale.teachers, mimscale.methods; "
        "print('open_clip' in sys.modules, 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_features_match_stock_open_clip(clip_file) -> None:
    """ln_post on every token and proj on every token (CAE v2, §2.6); no proj (MR-MAE, §4.3)."""
    path, model = clip_file
    v = views()
    x = (v.float() / 255 - CLIP_MEAN) / CLIP_STD
    model.visual.output_tokens = True
    with torch.no_grad():
        pooled, patch_tokens = model.visual(x)  # stock: ln_post(cls) @ proj, ln_post(patches)
    cae = build_provider(file_recipe(path), torch.device("cpu"))
    t = cae({"views": [v]}).tokens
    assert t.shape == (2, 65, 32)
    torch.testing.assert_close(t[:, 0], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t[:, 1:], patch_tokens @ model.visual.proj, rtol=1e-5, atol=1e-5)
    mr = build_provider(file_recipe(path, method="mr_mae"), torch.device("cpu"))
    t = mr({"views": [v]})
    torch.testing.assert_close(t.tokens[:, 1:], patch_tokens, rtol=1e-5, atol=1e-5)
    assert mr.metadata["random_weights"] is False and mr.metadata["weights"] == str(path)


def test_teacher_is_frozen_and_stays_in_eval(clip_file) -> None:
    p = build_provider(file_recipe(clip_file[0]), torch.device("cpu"))
    assert not p.model.training and all(not q.requires_grad for q in p.model.parameters())
    p.model.train()
    assert not p.model.training  # a teacher never leaves eval mode
    out = p({"views": [views()]})
    assert not out.tokens.requires_grad


def test_renormalisation_from_uint8() -> None:
    p = build_provider(recipe(), torch.device("cpu"))
    v = views()
    torch.testing.assert_close(p.preprocess(v), (v.float() / 255 - CLIP_MEAN) / CLIP_STD)


def test_random_weights_are_loud_and_recorded(capsys) -> None:
    p = build_provider(recipe(), torch.device("cpu"))
    assert "RANDOM weights" in capsys.readouterr().err
    assert p.metadata["random_weights"] is True and p.metadata["weights"] == "RANDOM"


def test_missing_weights_error_says_where_it_looked(tmp_path) -> None:
    cfg = [
        "teacher.width=null",
        "teacher.depth=null",
        "teacher.heads=null",
        "teacher.patch_size=null",
        "teacher.out_dim=null",
        "teacher.allow_random=false",
        f"teacher.cache_dir={tmp_path}",
    ]
    with pytest.raises(RecipeError, match="looked in") as e:
        build_provider(recipe("cae_v2", *cfg), torch.device("cpu"))
    msg = str(e.value)
    assert str(tmp_path) in msg and "vit_base_patch16_clip_224.openai" in msg and "allow_random" in msg
    missing = tmp_path / "nope.pt"
    with pytest.raises(RecipeError, match=str(missing)):
        build_provider(file_recipe(missing), torch.device("cpu"))


def test_grid_matching_rule_and_mismatch_error() -> None:
    cfg = TeacherConfig()
    assert teacher_image_size(cfg, 16, (14, 14), "t") == 224  # ViT-B/16 student at 224
    assert teacher_image_size(cfg, 16, (16, 16), "t") == 256  # ViT-H/14 student at 224 (§1.8 a)
    with pytest.raises(RecipeError, match=r"teacher grid 14x14 .* student grid 16x16"):
        teacher_image_size(TeacherConfig(img_size=224), 16, (16, 16), "ViT-B-16")
    with pytest.raises(RecipeError, match=r"teacher\.img_size: teacher grid 6x6 .*student grid 8x8"):
        build_provider(recipe("cae_v2", "teacher.img_size=24"), torch.device("cpu"))


def test_vit_h_student_gets_a_256px_patch16_teacher() -> None:
    """The real CLIP ViT-B/16 architecture (random) beside a ViT-H/14-at-224 student grid."""
    r = recipe(
        "cae_v2",
        "teacher.width=null",
        "teacher.depth=null",
        "teacher.heads=null",
        "teacher.patch_size=null",
        "teacher.out_dim=null",
        "model.patch_size=14",
        "model.img_size=224",
        "data.views=[{size: 224}]",
        "mask.num_masked=128",
    )
    p = build_provider(r, torch.device("cpu"))
    assert p.img_size == 256 and p.model.grid == (16, 16)
    assert p.model.embed.positional_embedding.shape == (257, 768)
    assert p({"views": [views(1, 224)]}).tokens.shape == (1, 257, 512)


def test_pos_embed_is_interpolated_bicubic_when_grids_differ(clip_file) -> None:
    """Weights at 8x8 (32 px); a patch-2 student at 32 px has 16x16 tokens -> teacher at 64 px."""
    path, model = clip_file
    r = file_recipe(path, "model.patch_size=2", "mask.num_masked=128", "cae_v2.regressor_dim=64")
    p = build_provider(r, torch.device("cpu"))
    assert p.img_size == 64 and p.model.grid == (16, 16)
    old = model.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    # open_clip resamples with antialias=True: the PIL-style bicubic kernel (a = -0.5).
    new = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    expected = torch.cat([old[:1], new.permute(0, 2, 3, 1).reshape(256, -1)])
    torch.testing.assert_close(p.model.embed.positional_embedding, expected)
    x = p.preprocess(views(2, 32))
    assert x.shape == (2, 3, 64, 64)  # the student's view, resized for the teacher


def manual_cls_attention(blocks, x: torch.Tensor, heads: int, qkv_weight, qkv_bias, norm) -> torch.Tensor:
    """Last-block [CLS] -> patch attention written out (head mean, renormalised over patches)."""
    for blk in blocks[:-1]:
        x = blk(x)
    y = norm(blocks[-1], x)
    b, n, c = y.shape
    q, k, _ = F.linear(y, qkv_weight(blocks[-1]), qkv_bias(blocks[-1])).split(c, dim=-1)
    q = q.reshape(b, n, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, n, heads, c // heads).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1).mean(1)[:, 0, 1:]
    return a / a.sum(-1, keepdim=True)


def test_cls_attention_open_clip_matches_manual(clip_file) -> None:
    p = build_provider(file_recipe(clip_file[0], "teacher.cls_attn=true"), torch.device("cpu"))
    x = p.preprocess(views())
    out = p.model(x, cls_attn=True)
    with torch.no_grad():
        expected = manual_cls_attention(
            list(p.model.blocks), p.model.embed(x), 4,
            lambda b: b.attn.in_proj_weight, lambda b: b.attn.in_proj_bias, lambda b, h: b.ln_1(h),
        )  # fmt: skip
    torch.testing.assert_close(out.cls_attn, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tokens, p.model(x).tokens)  # the same forward, same features


def test_timm_teacher_cls_attention_and_features() -> None:
    r = recipe(
        "mr_mae",
        "teacher.kind=timm",
        "teacher.model=vit_base_patch16_224.dino",
        "teacher.out_dim=null",
        "teacher.pretrained=default",
    )
    p = build_provider(r, torch.device("cpu"))
    assert p._mean.flatten().tolist() == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    # DINO: ImageNet normalisation from timm's config, recorded as used (not null)
    assert p.metadata["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert p.metadata["std"] == pytest.approx([0.229, 0.224, 0.225])
    x = p.preprocess(views())
    out = p.model(x, cls_attn=True)
    with torch.no_grad():
        expected = manual_cls_attention(
            list(p.model.blocks), p.model.embed(x), 4,
            lambda b: b.attn.qkv.weight, lambda b: b.attn.qkv.bias, lambda b, h: b.norm1(h),
        )  # fmt: skip
    torch.testing.assert_close(out.cls_attn, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tokens, p.model(x).tokens, rtol=1e-5, atol=1e-6)
    assert out.tokens.shape == (2, 65, 64)


def test_timm_projection_is_rejected() -> None:
    with pytest.raises(RecipeError, match=r"teacher\.proj"):
        recipe("cae_v2", "teacher.kind=timm", "teacher.model=vit_base_patch16_224.dino")


OFFLOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from mimscale.registry import load_recipe
    from mimscale.engine.distributed import init_distributed
    from mimscale.teachers import build_provider

    init_distributed()  # a world of one (gloo); ZeRO-Inference needs a process group
    r = load_recipe(sys.argv[1], [f"teacher.pretrained={sys.argv[2]}", "teacher.allow_random=false",
                                  "teacher.cls_attn=true"])
    resident = build_provider(r, torch.device("cpu"))
    r.teacher.offload = True
    off = build_provider(r, torch.device("cpu"))
    assert type(off._run).__name__ == "DeepSpeedEngine", type(off._run)
    assert all(p.ds_status is not None for p in off.model.parameters())  # ZeRO-3 partitioned
    v = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    a, b = resident({"views": [v]}), off({"views": [v]})
    torch.testing.assert_close(b.tokens, a.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.cls_attn, a.cls_attn, rtol=1e-5, atol=1e-6)
    print("OFFLOAD_OK", (b.tokens - a.tokens).abs().max().item())
    """
)


@pytest.mark.slow
def test_offloaded_teacher_equals_resident(clip_file, tmp_path) -> None:
    """DeepSpeed ZeRO-Inference (params in host memory, gathered per module) gives the resident
    teacher's outputs. Its own process: it initialises torch.distributed."""
    script = tmp_path / "offload.py"
    script.write_text(OFFLOAD_SCRIPT)
    rec = REPO / "recipes/cae_v2/cpu_tiny.yaml"
    out = subprocess.run(
        [sys.executable, str(script), str(rec), str(clip_file[0])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert "OFFLOAD_OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
