"""Memory per GPU of one training setting: model states (ZeRO), activations, method extras.

Model states follow what DeepSpeed allocates, per rank, for ``P`` trainable and ``F`` frozen
parameters over ``N`` data-parallel ranks (checked against a real engine's tensors in
tests/scaling/test_memory.py):

=========  =====================  ===========================  ======================
precision  parameters             gradients                    optimizer states
=========  =====================  ===========================  ======================
fp32, Z0   4 (P + F)              4 P                          8 P (Adam m, v)
fp32, Z1-2 4 (P + F)              4 P / N                      12 P / N (fp32 master + m, v)
fp32, Z3   4 (P + F) / N          4 P / N                      12 P / N
bf16, Z0-1 2 (P + F)              2 P + 4 P (fp32 accumulator) 12 P (Z0) or 12 P / N (Z1)
bf16, Z2   2 (P + F)              (2 + 4) P / N                12 P / N
bf16, Z3   2 (P + F) / N          4 P / N                      12 P / N
=========  =====================  ===========================  ======================

bf16 ZeRO-2/3 equal DeepSpeed's own ``estimate_zero2/3_model_states_mem_needs`` (2 P + 18 P / N;
18 P / N plus four bytes of the largest layer, which goes under buffers here).

Activations are counted per transformer block from its shapes (:func:`block_saved_bytes`): the
tensors autograd keeps for backward, checked against the saved tensors of a real forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mimscale.config import Recipe

GiB = 2**30
# DeepSpeed's default bucket sizes, in elements (reduce / all-gather at ZeRO-1/2, prefetch at ZeRO-3).
DS_BUCKET = 500_000_000
DS_PREFETCH = 50_000_000


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the trained module and of what lives beside it.

    ``trainable`` / ``frozen``: parameters of the module DeepSpeed trains; ``largest_layer``:
    the most parameters one module holds directly (ZeRO-3 gathers one layer at a time);
    ``momentum``: fp32 EMA / momentum copy kept outside the engine; ``teacher``: the frozen
    teacher's parameters (0 when it is precomputed).
    """

    trainable: int
    frozen: int = 0
    largest_layer: int = 0
    momentum: int = 0
    teacher: int = 0


@dataclass(frozen=True)
class Stack:
    """``depth`` transformer blocks that run on ``tokens`` tokens of width ``dim`` per sample,
    ``copies`` times per sample (views), keeping activations for backward."""

    name: str
    tokens: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    copies: int = 1
    layer_scale: bool = False


@dataclass
class Memory:
    """Bytes per GPU of one setting, by part (``total`` sums them)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    extras: float  # momentum copy, teacher weights, MTO affinities, input batch
    buffers: float  # DeepSpeed communication buckets / gathered ZeRO-3 layers

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.extras + self.buffers

    def gib(self) -> dict[str, float]:
        parts = ("params", "grads", "optimizer", "activations", "extras", "buffers")
        out = {k: getattr(self, k) / GiB for k in parts}
        out["total"] = self.total / GiB
        return out


def model_states(c: Counts, stage: int, world: int, bf16: bool) -> tuple[float, float, float]:
    """``(parameters, gradients, optimizer states)`` bytes per rank (module docstring's table)."""
    p, f, n = c.trainable, c.frozen, world
    w = 2 if bf16 else 4
    params = w * (p + f) / (n if stage == 3 else 1)
    if not bf16:
        grads = 4 * p if stage == 0 else 4 * p / n
        opt = 8 * p if stage == 0 else 12 * p / n
    elif stage <= 1:
        grads, opt = 6 * p, (12 * p if stage == 0 else 12 * p / n)
    else:
        grads, opt = (6 * p if stage == 2 else 4 * p) / n, 12 * p / n
    return params, grads, opt


def ds_buffers(c: Counts, stage: int, bf16: bool) -> float:
    """DeepSpeed's transient buffers at its default sizes: the reduce and all-gather buckets
    (ZeRO-1/2, capped by the model), the gathered largest layer in fp32 as DeepSpeed's estimator
    counts it plus the prefetch bucket (ZeRO-3); nothing at ZeRO-0."""
    w = 2 if bf16 else 4
    total = c.trainable + c.frozen
    if stage in (1, 2):
        return 2 * w * min(DS_BUCKET, c.trainable)
    if stage == 3:
        return 4 * c.largest_layer + w * min(DS_PREFETCH, total)
    return 0.0


def block_saved_bytes(s: Stack, batch: int, elem: int) -> float:
    """Bytes autograd keeps for backward in one timm ``Block`` (fused attention), per call.

    Per token of width d, in the activation dtype: LayerNorm 1 input, the qkv input, q/k/v
    (one [n, 3d] tensor), the attention output, the projection input, LayerNorm 2 input and the
    fc1 input (9 d), GELU input and fc2 input (2 r d); in fp32: each LayerNorm's mean and rstd
    (4 floats) and the attention's log-sum-exp (one float per head). Layer scale keeps the two
    scaled inputs (2 d).
    """
    n, d = s.tokens, s.dim
    per_token = elem * d * (9 + 2 * s.mlp_ratio + (2 if s.layer_scale else 0)) + 4 * (4 + s.heads)
    return float(batch * s.copies * n * per_token)


def activation_bytes(
    stacks: list[Stack], batch: int, elem: int, checkpointing: bool, io: float = 0.0
) -> float:
    """Saved activations of the blocks for ``batch`` samples, plus ``io`` (:func:`io_bytes`).

    With activation checkpointing a block keeps only its input ([n, d]); backward recomputes one
    block at a time, so the largest single block's saved tensors are added once.
    """
    if not checkpointing:
        return io + sum(s.depth * block_saved_bytes(s, batch, elem) for s in stacks)
    inputs = sum(s.depth * batch * s.copies * s.tokens * s.dim * elem for s in stacks)
    return io + inputs + max((block_saved_bytes(s, batch, elem) for s in stacks), default=0.0)


PIXEL_METHODS = ("mae", "simmim", "mr_mae", "lc_mae")


def io_bytes(recipe: Recipe, batch: int, elem: int) -> float:
    """What autograd keeps outside the blocks: the normalised views (the patch embedding's input)
    and, for pixel targets, the fp32 prediction, target and normalised target ([N, p^2 3] each)."""
    m = recipe.model
    views = len(recipe.data.views)
    out = float(batch * views * 3 * m.img_size**2 * elem)
    if recipe.method in PIXEL_METHODS:
        n = (m.img_size // m.patch_size) ** 2
        out += 3 * 4 * batch * views * n * m.patch_size**2 * 3
    return out


def stacks_of(recipe: Recipe) -> list[Stack]:
    """The transformer stacks of ``recipe``'s method that keep activations (no-grad passes --
    momentum encoders, teachers -- keep none). Other methods fall back to the encoder alone."""
    from mimscale.models.vit import SIZES

    m, cfg = recipe.model, recipe.method_cfg
    dim, depth, heads = SIZES[m.size]
    dim, depth, heads = m.embed_dim or dim, m.depth or depth, m.num_heads or heads
    n = (m.img_size // m.patch_size) ** 2
    masked = recipe.mask.num_masked if recipe.mask.num_masked is not None else round(n * recipe.mask.ratio)
    vis = n - masked
    ls = m.layer_scale is not None
    enc_all = Stack("encoder", n + 1, dim, depth, heads, layer_scale=ls)
    enc_vis = Stack("encoder", vis + 1, dim, depth, heads, layer_scale=ls)
    method = recipe.method
    if method in ("mae", "mr_mae", "lc_mae"):
        views = 2 if method == "lc_mae" else 1
        dec = Stack("decoder", n + 1, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, copies=views)
        return [Stack("encoder", vis + 1, dim, depth, heads, copies=views, layer_scale=ls), dec]
    if method == "cae_v2":
        out = [enc_vis]
        if "masked" in cfg.supervise:
            rdim = cfg.regressor_dim or dim
            out.append(
                Stack("regressor", masked, rdim, cfg.regressor_depth, cfg.regressor_heads, layer_scale=True)
            )
        return out
    return [enc_all]


def extras_bytes(recipe: Recipe, c: Counts, batch: int, elem: int) -> float:
    """Method extras per GPU: the fp32 momentum copy, the teacher's weights (online: in the
    activation dtype; offloaded: one block streamed; precomputed: none), MTO's per-layer affinity
    matrices ([n, n] per layer, softmax output kept), and the input views."""
    out = 4.0 * c.momentum
    t = recipe.teacher
    if c.teacher and t.source == "online":
        depth = teacher_shape(recipe)[1] if t.offload else 1
        out += elem * c.teacher / depth
    if recipe.mto.enabled:
        host = max(stacks_of(recipe), key=lambda s: s.tokens)
        out += 2 * 4 * (host.depth + 1) * batch * host.tokens**2
    views = len(recipe.data.views)
    out += batch * views * 3 * recipe.model.img_size**2  # the uint8 views (normalised: activations)
    return out


def teacher_shape(recipe: Recipe) -> tuple[int, int, int, float]:
    """(width, depth, patch size, MLP ratio) of the recipe's teacher ViT, as it will be built: its
    architecture keys, else the shapes of the weights file ``teacher.pretrained`` names, else the
    named model's (open_clip's config or timm's model on the meta device), else CLIP ViT-B/16."""
    from mimscale.teachers.weights import file_arch

    t = recipe.teacher
    arch = file_arch(t)
    named = (768, 12, 16, 4.0) if arch is not None else _named_shape(t.kind, t.model)
    width = t.width or (arch.width if arch else named[0])
    depth = t.depth or (arch.depth if arch else named[1])
    patch = t.patch_size or (arch.patch_size if arch else named[2])
    return width, depth, patch, arch.mlp_ratio if arch else named[3]


def _named_shape(kind: str, model: str) -> tuple[int, int, int, float]:
    """(width, depth, patch, MLP ratio) of a named teacher model; CLIP ViT-B/16's when unknown."""
    if kind == "open_clip":
        import open_clip

        cfg = (open_clip.get_model_config(model) or {}).get("vision_cfg")
        if cfg:
            mlp = float(cfg.get("mlp_ratio", 4.0))
            return int(cfg["width"]), int(cfg["layers"]), int(cfg["patch_size"]), mlp
    elif kind == "timm":
        import timm
        import torch

        try:
            with torch.device("meta"):
                m: Any = timm.create_model(model, pretrained=False, num_classes=0)
            mlp = m.blocks[0].mlp.fc1.out_features / m.embed_dim
            return int(m.embed_dim), len(m.blocks), int(m.patch_embed.patch_size[0]), float(mlp)
        except (RuntimeError, AttributeError):  # not a plain ViT: counted as CLIP ViT-B/16
            pass
    return 768, 12, 16, 4.0


def teacher_params(recipe: Recipe) -> int:
    """Parameters of the recipe's teacher ViT (:func:`teacher_shape`): (4 + 2 r) d^2 per block
    (r the MLP ratio), the patch embedding and the position embedding (its grid is the student's)."""
    width, depth, patch, mlp = teacher_shape(recipe)
    tokens = (recipe.model.img_size // recipe.model.patch_size) ** 2 + 1
    blocks = depth * ((4 + 2 * mlp) * width * width + 13 * width)
    return int(blocks + 3 * patch * patch * width + tokens * width)


def shaped_method(recipe: Recipe) -> Any:
    """The recipe's method with its real shapes: built on the meta device (no memory), or on the
    CPU for a method whose construction reads tensor values (CAE v2's drop-path rates)."""
    import torch

    from mimscale.methods import build_method

    try:
        with torch.device("meta"):
            return build_method(recipe)
    except (NotImplementedError, RuntimeError):
        with torch.no_grad():
            return build_method(recipe)


def count_params(recipe: Recipe, method: Any = None) -> Counts:
    """Exact parameter counts of the recipe's method (``method``: one already built)."""
    from mimscale.methods import METHODS
    from mimscale.models.ema import MomentumCopy

    method = shaped_method(recipe) if method is None else method
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in method.modules())
    copies = [m for m in method.modules() if isinstance(m, MomentumCopy)]
    momentum = sum(p.numel() for m in copies for p in m.shadow.parameters())
    teacher = 0
    if METHODS[recipe.method].needs_teacher and recipe.teacher.source == "online":
        teacher = teacher_params(recipe)
    return Counts(trainable, frozen, largest, momentum, teacher)


def estimate(
    recipe: Recipe, c: Counts, stage: int, world: int, micro: int, checkpointing: bool, bf16: bool
) -> Memory:
    """Every part of :class:`Memory` for one setting (per GPU)."""
    elem = 2 if bf16 else 4
    params, grads, opt = model_states(c, stage, world, bf16)
    act = activation_bytes(stacks_of(recipe), micro, elem, checkpointing, io_bytes(recipe, micro, elem))
    return Memory(params, grads, opt, act, extras_bytes(recipe, c, micro, elem), ds_buffers(c, stage, bf16))


def train_flops(recipe: Recipe, method: Any = None) -> tuple[float, str]:
    """FLOPs per image of a training step and where the number comes from."""
    from mimscale.models.flops import block_flops

    method = shaped_method(recipe) if method is None else method
    flops = method.train_flops_per_image()
    if flops is not None:
        return float(flops), "method.train_flops_per_image"
    fwd = sum(s.copies * s.depth * block_flops(s.tokens, s.dim, s.mlp_ratio) for s in stacks_of(recipe))
    from mimscale.methods import METHODS

    t = recipe.teacher
    if METHODS[recipe.method].needs_teacher and t.source == "online":  # its forward only, no backward
        n = (recipe.model.img_size // recipe.model.patch_size) ** 2 + 1  # the teacher's grid is the student's
        width, depth, _, mlp = teacher_shape(recipe)
        teacher = depth * block_flops(n, width, mlp)
        return (
            3.0 * fwd + teacher,
            "3x forward of the method's blocks + the teacher's forward (counted by plan)",
        )
    return 3.0 * fwd, "3x forward of the method's blocks (counted by plan)"
