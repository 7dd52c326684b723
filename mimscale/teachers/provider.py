"""The frozen teacher as a target provider (docs/methods.md §1.8, §6.1).

The engine calls :func:`build_provider` once, outside ``deepspeed.initialize`` (DeepSpeed issue
#3175: a teacher inside a ZeRO-3 student engine breaks), and then ``targets = provider(batch)``
per micro-batch. The teacher is frozen, in eval mode, runs under ``no_grad`` (bf16 on GPU), is in
no optimizer group and in no training checkpoint. It sees the student's exact view (crop, flip,
colour jitter: ``batch["views"][0]``, uint8), renormalised with its own mean/std on the device and
resized so that its token grid equals the student's (docs/methods.md §1.8 option a: a ViT-H/14 student
at 224 px has 16x16 tokens, so a patch-16 teacher gets 256 px with interpolated position
embeddings).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from mimscale.config import RecipeError, TeacherConfig
from mimscale.teachers.towers import build_tower, patch_of
from mimscale.teachers.weights import as_file, file_arch, missing_weights, resolve_weights

if TYPE_CHECKING:
    from mimscale.config import Recipe
    from mimscale.models.teacher_vit import TeacherViT


def check_recipe(recipe: Recipe, method_cls: type) -> None:
    """The ``teacher:`` section's checks that need no model (the grid is checked at build time)."""
    cfg = recipe.teacher
    if cfg.kind == "timm" and cfg.proj:
        raise RecipeError(".teacher.proj: timm teachers have no output projection; use proj: false")
    if cfg.layer == 0 or cfg.layer < -1:
        raise RecipeError(f".teacher.layer: expected -1 (last) or a block number >= 1, got {cfg.layer}")
    if (cfg.mean is None) != (cfg.std is None) or (cfg.mean is not None and len(cfg.mean) != 3):
        raise RecipeError(".teacher.mean: give both teacher.mean and teacher.std, three values each")
    if cfg.arch_overrides() and not cfg.allow_random and as_file(cfg.pretrained) is None:
        raise RecipeError(
            ".teacher.width: architecture overrides do not fit a pretrained tag's weights; give "
            "teacher.pretrained a matching weights file or set teacher.allow_random: true"
        )


class TeacherTargets(NamedTuple):
    """What a provider returns for one micro-batch (one row per view, not per mask repeat).

    ``tokens``: ``[B, 1 + N, C_t]`` (cls first, patches in the student's raster order).
    ``cls_attn``: float32 ``[B, N]`` last-block [CLS] attention (sums to 1), or None.
    """

    tokens: torch.Tensor
    cls_attn: torch.Tensor | None


class TeacherProvider:
    """Callable target provider around a frozen :class:`TeacherViT`.

    Attributes:
        model: the frozen teacher module (never shares parameters with the student).
        metadata: what was built (weights file or "RANDOM", grid, size, dtype, offload), for the
            run's metadata.
    """

    def __init__(
        self,
        model: TeacherViT,
        cfg: TeacherConfig,
        mean: list[float],
        std: list[float],
        device: torch.device,
        dtype: torch.dtype,
        metadata: dict[str, Any],
        runner: Any = None,
    ) -> None:
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        self.img_size = model.img_size
        self.metadata = metadata
        # uint8 -> teacher input: (x / 255 - mean) / std == (x - 255 mean) / (255 std).
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self._run = runner if runner is not None else model  # a ZeRO-Inference engine when offloaded

    def preprocess(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` on device -> normalised ``[B, 3, S, S]`` in the teacher dtype."""
        x = views.to(self.device, non_blocking=True).float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(
                x,
                size=(self.img_size, self.img_size),
                mode=self.cfg.resize,
                align_corners=False,
                antialias=x.shape[-1] > self.img_size,
            )
            x = x.clamp(0.0, 255.0)  # bicubic overshoot, as PIL's uint8 resize would clip
        return ((x - self._mean) / self._std).to(self.dtype)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherTargets:
        """Teacher targets for ``batch["views"][0]`` (the student's view), one row per view."""
        out = self._run(self.preprocess(batch["views"][0]), cls_attn=self.cfg.cls_attn)
        return TeacherTargets(out.tokens, out.cls_attn)


def teacher_image_size(
    cfg: TeacherConfig, teacher_patch: int, student_grid: tuple[int, int], where: str
) -> int:
    """The teacher resolution whose token grid equals the student's.

    Raises:
        RecipeError: a non-square student grid, or a fixed ``teacher.img_size`` giving another grid
            (the message names both grids).
    """
    if student_grid[0] != student_grid[1]:
        raise RecipeError(f".teacher.img_size: non-square student grid {student_grid} cannot be matched")
    if cfg.img_size is None:
        return teacher_patch * student_grid[0]
    g = cfg.img_size // teacher_patch
    if cfg.img_size % teacher_patch or g != student_grid[0]:
        raise RecipeError(
            f".teacher.img_size: teacher grid {g}x{g} ({where} at {cfg.img_size} px, patch {teacher_patch}) "
            f"differs from the student grid {student_grid[0]}x{student_grid[1]}; set teacher.img_size to "
            f"{teacher_patch * student_grid[0]} or null (match automatically)"
        )
    return cfg.img_size


def _dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]


def _warn_random(cfg: TeacherConfig, looked: list[str]) -> None:
    bar = "!" * 100
    print(
        f"{bar}\n[mimscale] WARNING: teacher {cfg.kind}:{cfg.model} has RANDOM weights "
        f"(teacher.allow_random: true; looked in {'; '.join(looked)}).\n"
        "[mimscale] Its targets are meaningless for research: use it for tests and the CPU demo only.\n"
        f"{bar}",
        file=sys.stderr,
        flush=True,
    )


def build_provider(recipe: Recipe, device: torch.device) -> TeacherProvider:
    """Build the recipe's frozen teacher on ``device``, its grid matched to the student's.

    Args:
        recipe: the validated recipe (``recipe.teacher``, ``recipe.model``).
        device: where the teacher runs (its weights stay on the host when ``teacher.offload``).

    Returns:
        A :class:`TeacherProvider`; ``provider(batch)`` gives :class:`TeacherTargets`.

    Raises:
        RecipeError: missing weights (unless ``allow_random``), unknown tag, unmatched grid.
    """
    cfg = recipe.teacher
    grid = (recipe.model.img_size // recipe.model.patch_size,) * 2
    weights, looked = resolve_weights(cfg)
    if weights is None and not cfg.allow_random:
        raise missing_weights(cfg, looked)
    arch = file_arch(cfg)  # a user's file fixes the architecture (checked against the keys)
    patch = patch_of(cfg, arch)
    size = teacher_image_size(cfg, patch, grid, f"{cfg.kind}:{cfg.model}")
    model, mean, std = build_tower(cfg, weights, size, arch)
    if weights is None:
        _warn_random(cfg, looked)
    dtype = _dtype(cfg, device)
    meta = {
        **asdict(cfg), "weights": weights or "RANDOM", "random_weights": weights is None,
        "img_size": size, "grid": list(model.grid), "out_dim": model.out_dim, "torch_dtype": str(dtype),
        "mean": mean, "std": std,  # what the teacher is fed with, whoever chose it
        "arch_from_file": asdict(arch) if arch is not None else None,
    }  # fmt: skip
    if cfg.offload:
        runner = _zero_inference(model, device, dtype)
        return TeacherProvider(model, cfg, mean, std, device, dtype, meta, runner)
    model.to(device=device, dtype=dtype)
    return TeacherProvider(model, cfg, mean, std, device, dtype, meta)


def teacher_out_dim(cfg: TeacherConfig) -> int:
    """Channels of the teacher's tokens, from its config alone (sizes a student's head).

    open_clip: ``embed_dim`` with ``proj`` (512 for CLIP-B/16), else the tower width (768);
    timm: ``embed_dim``. A weights file's shapes decide (read without building the model);
    without one, the architecture keys (``out_dim``, ``width``) win.
    """
    arch = file_arch(cfg)
    if arch is not None:
        return int(arch.out_dim if cfg.kind == "open_clip" and cfg.proj and arch.out_dim else arch.width)
    if cfg.kind == "open_clip":
        import open_clip

        mc = open_clip.get_model_config(cfg.model)
        if mc is None:
            raise RecipeError(f".teacher.model: unknown open_clip model {cfg.model!r}")
        if cfg.proj:
            return int(cfg.out_dim or mc["embed_dim"])
        return int(cfg.width or mc["vision_cfg"]["width"])
    if cfg.width is not None:
        return cfg.width
    import timm

    with torch.device("meta"):
        model: Any = timm.create_model(cfg.model, pretrained=False, num_classes=0)
        return int(model.embed_dim)


def _zero_inference(model: TeacherViT, device: torch.device, dtype: torch.dtype) -> Any:
    """DeepSpeed ZeRO-Inference: a ZeRO-3 engine without optimizer whose parameters live in host
    memory and are gathered to ``device`` block by block (with prefetch) during the forward.

    A separate engine from the student's (DeepSpeed #3175); needs torch.distributed initialised.
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": device.type == "cuda"},
            "stage3_param_persistence_threshold": 0,  # stream everything, small tensors too
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,
    }
    model.to(dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
