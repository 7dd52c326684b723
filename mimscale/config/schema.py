"""The typed recipe schema: every section and its defaults, in one place.

Nothing here imports anything above it (methods, teachers, evaluation): the loader
(:mod:`mimscale.config.loader`) validates YAML against these dataclasses, and the registry
(:mod:`mimscale.registry`) adds the method sections and the cross-section checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms; CPU exact-resume tests set it
    resume: Literal["auto", "never"] = "auto"  # auto: continue from out_dir/name/checkpoints/latest


@dataclass
class ViewConfig:
    """One augmented view of a sample (crop params are recorded for exact replay)."""

    size: int = 224
    # rrc: RandomResizedCrop; simple: LC-MAE's simple resized crop (short-side resize, padded crop)
    crop: Literal["rrc", "simple", "center", "resize"] = "rrc"
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    hflip: float = 0.5
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; hue = strength / 4
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0


@dataclass
class DataConfig:
    train: str = ""  # manifest.json, or a brace pattern / pipe: url understood by WebDataset
    val: str = ""  # labeled shards for evaluation hooks
    epoch_mode: Literal["resampled", "exact"] = "resampled"
    samples_per_epoch: int | None = None  # default: the manifest's total
    num_workers: int = 4
    shuffle_buffer: int = 1000
    on_error: Literal["skip", "fail"] = "skip"
    draft: bool = True  # PIL JPEG draft mode when the crop is downscaled anyway (cpu decode only)
    # Where JPEGs are decoded. cpu: in the data workers (PIL). gpu: on the training device (nvjpeg
    # through torchvision on CUDA; libjpeg when the device is the CPU, as in the tests): workers
    # only read headers and draw the same crop records. Geometric views only (rrc/center/resize).
    # Training loader only; evaluation loaders decode on the CPU.
    decode: Literal["cpu", "gpu"] = "cpu"
    # Images above this many pixels (width x height, read from the header) are skipped and
    # counted as bad samples before decoding: one 12k x 12k PNG decodes to ~430 MB per worker.
    max_pixels: int = 64_000_000
    views: list[ViewConfig] = field(default_factory=lambda: [ViewConfig()])


@dataclass
class MaskConfig:
    """Masks are data: generated in collate, ``True = masked``."""

    kind: Literal["random", "block", "random_coarse", "none"] = (
        "random"  # random_coarse: on a mask_patch_size grid (SimMIM)
    )
    ratio: float = 0.75
    num_masked: int | None = None  # block: exact masked count (default round(ratio * N))
    min_num_patches: int = 16  # block: minimum block area (BEiT / CAE pre-training args)
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    mask_patch_size: int = 32  # random_coarse: mask-patch size in pixels
    repeats: int = 1  # amortised teacher: masks per view


@dataclass
class ModelConfig:
    size: Literal["tiny", "small", "base", "large", "huge"] = "base"
    arch: Literal["vit", "beit"] = "vit"  # beit: q/v bias, optional relative position bias
    patch_size: int = 16
    img_size: int = 224
    num_heads: int | None = None  # override (ViT-T with 12 heads as CAE v2)
    embed_dim: int | None = None  # override (tiny CPU models)
    depth: int | None = None  # override (tiny CPU models)
    drop_path: float = 0.0
    layer_scale: float | None = None  # layer-scale init (None = off)
    abs_pos: Literal["sincos", "none"] = "sincos"
    sincos_layout: Literal["mae", "cae"] = "mae"  # channel layout of the fixed table (docs/methods.md §1.2)
    rel_pos_bias: Literal["none", "shared"] = "none"  # beit only (SimMIM uses shared)
    init_from: str = ""  # run dir whose weights start a fresh run (e.g. from `mimscale import-weights`)


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute lr; exclusive with blr
    blr: float | None = None  # base lr, scaled by lr_scaling
    lr_scaling: Literal["none", "linear256", "linear512", "sqrt"] = "linear256"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    wd_exclude: Literal["ndim1_bias", "ndim1_bias_tokens", "ndim1_bias_cls_pos"] = (
        "ndim1_bias"  # docs/methods.md §6.8
    )
    layer_decay: float | None = None
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)  # multistep: epochs
    gamma: float = 0.1
    clip_grad: float | None = None
    # lars: timm's LARS (MAE linear probe, docs/methods.md §1.3), momentum 0.9, trust ratio on the
    # ndim > 1 weights only (MAE util/lars.py); betas / eps are AdamW's.
    optimizer: Literal["adamw", "lars"] = "adamw"


@dataclass
class TrainConfig:
    epochs: float = 1.0
    global_batch: int = 4096
    micro_batch: int = 64  # per rank; accumulation = global / (micro * world)
    zero_stage: int = 1
    # auto: bf16 on GPU, fp32 on CPU; autocast: fp32 parameters and optimizer, bf16 matmuls
    # (DeepSpeed's own torch_autocast mode, engine/optim.py::deepspeed_config).
    precision: Literal["auto", "bf16", "fp32", "autocast"] = "auto"
    activation_checkpointing: bool = False
    # Regional torch.compile of every transformer block: auto (on for CUDA, off on CPU where the
    # compile time is not paid back), true or false (YAML reads on/off as booleans too).
    compile: Literal["auto"] | bool = "auto"
    log_every: int = 20
    ckpt_every: int = 1000  # optimizer steps; a final checkpoint is always written
    keep_last: int = 3
    keep_steps: list[int] = field(default_factory=list)  # never pruned (e.g. MTO's epoch-400 checkpoint)
    nan_patience: int = 5  # consecutive non-finite steps before reloading the last checkpoint
    max_steps: int | None = None  # stop early (tests, benchmarks); the schedule still spans epochs
    log_keys: bool = False  # write every consumed sample key to run_dir/keys_rank{r}.txt (resume audits)
    # Reconstruction pictures (input, mask, prediction, prediction + visible) of the first
    # recon_images samples of a step, every recon_every optimizer steps and at the end (0: off), for
    # methods that predict pixels: run_dir/images/recon_step*.png, and to wandb when it is on.
    recon_every: int = 5000
    recon_images: int = 8


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: Literal["online", "offline", "disabled"] = "online"
    project: str = "mimscale"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TeacherConfig:
    """The ``teacher:`` section, read by methods with ``needs_teacher`` (mimscale.teachers).

    The defaults are CAE v2's / MR-MAE's CLIP ViT-B/16 (OpenAI weights) for every student size;
    each method's ``_base_`` recipe states its feature choice (docs/methods.md §2.6, §4.3).
    """

    kind: Literal["open_clip", "timm"] = "open_clip"
    model: str = "ViT-B-16"  # open_clip model name, or a timm name such as vit_base_patch16_224.dino
    # open_clip: a pretrained tag ("openai") resolved from the local cache; timm: "default" (the
    # name's pretrained tag, from the local Hugging Face cache). Either: or a weights file path.
    pretrained: str = "openai"
    cache_dir: str | None = None  # where cached weights live (default: the library's own cache)
    allow_random: bool = False  # missing weights -> random teacher, loudly (tests / CPU demo only)
    layer: int = -1  # blocks to run: -1 = all (the last block's output), k = the output of block k
    norm: bool = True  # final norm (ln_post / timm norm) on every token
    proj: bool = False  # open_clip proj on every token (CAE v2: 768 -> 512); MR-MAE: off
    cls_attn: bool = False  # also return the last block's [CLS] attention (MR-MAE focused mimicking)
    img_size: int | None = None  # None: patch * student grid (the grids match); else must match
    resize: Literal["bicubic", "bilinear"] = "bicubic"  # view -> teacher size, when they differ
    mean: list[float] | None = None  # None: the weights' own (CLIP for open_clip, timm's cfg)
    std: list[float] | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload: bool = False  # DeepSpeed ZeRO-Inference: weights in host memory, streamed per block
    # online: run the teacher every step; precomputed: read its targets from a bank written by
    # `mimscale precompute-targets` (teacher.bank: the bank's directory or its manifest.json).
    source: Literal["online", "precomputed"] = "online"
    bank: str = ""
    # Architecture of a tiny random teacher (CPU tests / demo; needs allow_random). With a weights
    # file the architecture is read from the file: a key set here must equal the file's value.
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    out_dim: int | None = None
    # A weights file whose patch differs from teacher.patch_size: resample its patch embedding
    # (timm's resample_patch_embed, logged) instead of stopping. Off: a resize is never silent.
    resize_patch_embed: bool = False

    def arch_overrides(self) -> dict[str, int]:
        """The architecture keys that are set (tiny random teachers)."""
        keys = ("width", "depth", "heads", "patch_size", "out_dim")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class MTOConfig:
    """The ``mto:`` section (mimscale.methods.mto); defaults are docs/methods.md §5.8's chosen defaults."""

    enabled: bool = False
    # §5.8 #1: "intent" = softplus(H^l - H^{l-1}) (heterogeneity falls with depth, as the text
    # says); "paper_literal" = softplus(H^{l-1} - H^l), Eq. 5 as printed.
    rank_sign: Literal["intent", "paper_literal"] = "intent"
    # §5.8 #2: Eq. 3 sums over visible rows ("sum"); "mean" divides by |V|.
    spa_reduction: Literal["mean", "sum"] = "mean"
    # §5.8 #3: affinity logits are scale * X X^T; 1.0 is paper-literal, "inv_sqrt_d" = 1/sqrt(D).
    logit_scale: float | Literal["inv_sqrt_d"] = 1.0
    eps: float = 1.0e-6  # §5.8 #4: epsilon of L_e = 1 / (H^0 + eps)
    lambda_spa: float = 1.0  # §5.8 #5: the paper sums the terms unweighted
    lambda_e: float = 1.0
    lambda_r: float = 1.0
    # §5.8 #7: per-layer features are the block outputs (residual stream) before the final norm.
    # The only supported value; the key records the choice in every resolved recipe.
    feature_point: Literal["block_output"] = "block_output"
    spa_exclude_diag: bool = False  # §5.8 #8: Eq. 3 keeps the self-affinity P_ii


Diagnostic = Literal["attention_distance", "spectrum", "heterogeneity"]


@dataclass
class EvalConfig:
    """The ``eval:`` section (mimscale.eval.hooks): periodic kNN / linear probe / top-1 / diagnostics."""

    every: int = 0  # optimizer steps between evaluations; 0 = only at the end (if at_end)
    at_end: bool = False  # also evaluate after the last step
    train: str = ""  # labeled bank for kNN / probe (manifest.json); default data.train
    val: str = ""  # held-out labeled split; default data.val
    batch_size: int = 256  # per rank, feature extraction
    pool: Literal["cls", "mean"] = "cls"  # cls: MAE linear-probe protocol; mean: patch tokens
    knn: bool = True  # weighted kNN (DINO): cosine, k, temperature
    k: int = 20
    temperature: float = 0.07
    linear: bool = True  # fast linear probe on cached features (BN w/o affine + linear)
    linear_iters: int = 100  # full-batch L-BFGS iterations of the fast probe
    linear_wd: float = 1e-4
    top1: bool = False  # the method's own classifier on eval.val (fine-tuning: method.predict)
    diagnostics: list[Diagnostic] = field(default_factory=list)  # JSON + PNG per evaluation
    diag_images: int = 64  # images from eval.val used by the diagnostics

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.at_end


# Fields of Recipe that the loader fills and that are never recipe keys.
INTERNAL = {"internal": True}


@dataclass
class Recipe:
    """One run's whole truth: the sections below, plus the selected method's own section.

    In YAML the method's section is keyed by the method's name (``mae: {norm_pix: true}``); the
    loader validates it against the method's ``Config`` (a table passed in by
    :mod:`mimscale.registry`) and stores it in ``method_cfg``.
    """

    method: str = "mae"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mto: MTOConfig = field(default_factory=MTOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_cfg: Any = field(default=None, metadata=INTERNAL)  # the method's Config instance
    source: str = field(default="<dict>", metadata=INTERNAL)  # the file it came from (errors)
    overrides: list[str] = field(default_factory=list, metadata=INTERNAL)  # `a.b=c` applied (errors)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (what is saved beside checkpoints)."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name == "method" or f.metadata.get("internal"):
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        if self.method_cfg is not None:
            out[self.method] = dataclasses.asdict(self.method_cfg)
        return out


def recipe_keys() -> list[str]:
    """The top-level keys of a recipe (the method's own section is keyed by its name)."""
    return [f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]
