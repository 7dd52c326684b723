"""Bringing a teacher: a timm or open_clip weights file (written here, tiny) fixes the teacher's
architecture; every way it can go wrong is one RecipeError naming the key, never a traceback from
inside timm / open_clip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimscale.config import RecipeError
from mimscale.registry import load_recipe
from mimscale.teachers import TINY_TEXT_CFG, build_provider, teacher_out_dim

REPO = Path(__file__).resolve().parents[2]
ARCH_NULL = [f"teacher.{k}=null" for k in ("width", "depth", "heads", "patch_size", "out_dim")]
CPU = torch.device("cpu")


def views(b: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A timm ViT unlike the named model in every size: width 128 (2 heads of 64), depth 3,
    patch 4 at 32 px, MLP ratio 2, saved as safetensors like a Hugging Face timm file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4,
                            embed_dim=128, depth=3, num_heads=2, mlp_ratio=2.0).eval()  # fmt: skip
    path = tmp_path_factory.mktemp("timm") / "digits_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A full open_clip CLIP (vision width 128, 2 heads of 64, depth 2, patch 8, proj -> 48)."""
    import open_clip

    torch.manual_seed(0)
    vision = dict(image_size=32, layers=2, width=128, patch_size=8, head_width=64)
    model = open_clip.create_model("ViT-B-16", pretrained=None, embed_dim=48, vision_cfg=vision,
                                   text_cfg=dict(TINY_TEXT_CFG)).eval()  # fmt: skip
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(model.state_dict(), path)
    return path, model


def timm_recipe(path: Path, *extra: str, method: str = "mr_mae"):
    over = [f"teacher.pretrained={path}", "teacher.allow_random=false", "teacher.kind=timm",
            "teacher.model=vit_tiny_patch16_224", "teacher.proj=false", *ARCH_NULL, *extra]  # fmt: skip
    return load_recipe(REPO / "recipes" / method / "cpu_tiny.yaml", over)


def clip_recipe(path: Path, *extra: str, method: str = "cae_v2"):
    over = [f"teacher.pretrained={path}", "teacher.allow_random=false", *ARCH_NULL, *extra]
    return load_recipe(REPO / "recipes" / method / "cpu_tiny.yaml", over)


def test_timm_file_gives_the_architecture_and_the_features(timm_file, capsys) -> None:
    path, vit = timm_file
    r = timm_recipe(path, "teacher.mean=[0.1,0.2,0.3]", "teacher.std=[0.5,0.5,0.5]")
    p = build_provider(r, CPU)
    assert len(p.model.blocks) == 3 and p.model.patch_size == 4 and p.model.out_dim == 128
    assert teacher_out_dim(r.teacher) == 128  # sizes the student's head from the file alone
    v = views()
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.full((1, 3, 1, 1), 0.5)
    with torch.no_grad():
        expected = vit.forward_features((v.float() / 255 - mean) / std)  # final norm on every token
    torch.testing.assert_close(p({"views": [v]}).tokens, expected, rtol=1e-5, atol=1e-5)
    assert p.metadata["mean"] == [0.1, 0.2, 0.3] and p.metadata["arch_from_file"]["mlp_ratio"] == 2.0
    assert "WARNING: teacher.mean/std not set" not in capsys.readouterr().err


def test_defaults_for_a_file_are_recorded_and_warned(timm_file, capsys) -> None:
    p = build_provider(timm_recipe(timm_file[0]), CPU)
    assert p.metadata["mean"] == [0.5, 0.5, 0.5] and p.metadata["std"] == [0.5, 0.5, 0.5]  # vit_tiny's cfg
    assert "teacher.mean/std not set" in capsys.readouterr().err


def test_open_clip_file_gives_the_architecture_and_the_features(clip_file) -> None:
    path, model = clip_file
    r = clip_recipe(path, "model.patch_size=8", "mask.num_masked=8", "mask.min_num_patches=2")
    assert teacher_out_dim(r.teacher) == 48  # proj output, from the file
    p = build_provider(r, CPU)
    assert p.model.out_dim == 48 and len(p.model.blocks) == 2 and p.model.grid == (4, 4)
    v = views()
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    model.visual.output_tokens = True
    with torch.no_grad():
        pooled, patches = model.visual((v.float() / 255 - clip_mean) / clip_std)
    t = p({"views": [v]}).tokens
    torch.testing.assert_close(t[:, 0], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t[:, 1:], patches @ model.visual.proj, rtol=1e-5, atol=1e-5)


def test_shipped_tiny_keys_against_a_real_file_name_every_key(timm_file) -> None:
    """The issue's case: cpu_tiny's random-teacher sizes left on with a real file."""
    r = load_recipe(REPO / "recipes/mr_mae/cpu_tiny.yaml", [
        f"teacher.pretrained={timm_file[0]}", "teacher.allow_random=false", "teacher.kind=timm",
        "teacher.model=vit_tiny_patch16_224", "teacher.out_dim=null"])  # fmt: skip
    with pytest.raises(RecipeError) as e:
        build_provider(r, CPU)
    msg = str(e.value)
    assert "teacher.width=64 (file: 128)" in msg and "teacher.depth=2 (file: 3)" in msg
    assert "teacher.width=null" in msg and "size mismatch" not in msg


def test_patch_resize_is_an_explicit_logged_choice(timm_file, capsys) -> None:
    path, _ = timm_file
    with pytest.raises(RecipeError, match=r"teacher\.patch_size=8 \(file: 4\).*resize_patch_embed"):
        build_provider(timm_recipe(path, "teacher.patch_size=8"), CPU)
    p = build_provider(timm_recipe(path, "teacher.patch_size=8", "teacher.resize_patch_embed=true"), CPU)
    assert p.model.patch_size == 8 and p.img_size == 64  # 8x8 grid at patch 8
    assert "resampling the file's patch_embed.proj.weight from patch 4 to 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("kind", r"teacher\.kind: .* holds timm weights; set teacher.kind=timm"),
        ("heads", r"teacher\.heads: the file's width 128 is not a multiple of .* 88; set teacher.heads"),
        ("heads_set", r"teacher\.heads: 3 heads do not divide the file's width 128"),
        ("family", r"teacher\.model: .* does not load into timm vit_small_patch16_18x2_224"),
        ("garbage", r"teacher\.pretrained: .* is not a readable state dict"),
        ("not_vit", r"teacher\.pretrained: .* is neither a timm ViT .* nor an open_clip CLIP"),
    ],
)
def test_bad_teacher_files_are_one_clear_error(timm_file, tmp_path, case, match) -> None:
    path = timm_file[0]
    if case == "kind":
        r = clip_recipe(path)
    elif case == "heads":  # ViT-g has 88-channel heads: 128 channels cannot be split into them
        r = timm_recipe(path, "teacher.model=vit_giant_patch14_224")
    elif case == "heads_set":
        r = timm_recipe(path, "teacher.heads=3")
    elif case == "family":
        r = timm_recipe(path, "teacher.model=vit_small_patch16_18x2_224")
    else:
        bad = tmp_path / "bad.pt"
        if case == "garbage":
            bad.write_bytes(b"not a checkpoint")
        else:
            torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, bad)
        r = timm_recipe(bad)
    with pytest.raises(RecipeError, match=match):
        build_provider(r, CPU)
