"""The ViT encoder: the one adapter that touches timm internals (STYLE.md point 11).

The inner module ``ViTEncoder.vit`` is a real timm model (``VisionTransformer`` or ``Beit``), so
``encoder.vit.state_dict()`` loads with ``strict=True`` into
``timm.create_model(encoder.timm_name, num_classes=0, **encoder.timm_kwargs)``. Only this file
reaches into its attributes (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``,
``rel_pos_bias``) to run the three token modes that timm's own forward cannot express.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.config import ModelConfig
from mimscale.models.pos_embed import cae_sincos_pos_embed, mae_sincos_pos_embed

# name -> (embed_dim, depth, num_heads), docs/methods.md §1.1. ViT-T uses 12 heads as CAE v2 /
# MAE-lite; ViT-S uses 6 heads (MAE / LUT / DeiT); override model.num_heads for CAE v2's 12.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 12),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

# Registered timm names whose keys match each arch/size (dims and heads come from timm_kwargs,
# which override the registered defaults). timm registers Beit only for base and large.
TIMM_NAMES: dict[str, dict[str, str]] = {
    "vit": {
        "tiny": "vit_tiny_patch16_224",
        "small": "vit_small_patch16_224",
        "base": "vit_base_patch16_224",
        "large": "vit_large_patch16_224",
        "huge": "vit_huge_patch14_224",
    },
    "beit": {"base": "beit_base_patch16_224", "large": "beit_large_patch16_224"},
}

Mode = Literal["visible", "mask_token", "all"]

# Layer-wise lr decay groups, MAE util/lr_decay numbering: the embeddings are layer 0, block k is
# layer k + 1, everything else (final norm, shared rel-pos bias as BEiT, decoders, heads) is on top.
_STEM = r"(?:mask_token|vit\.(?:cls_token|pos_embed|patch_embed))"  # no capture: timm reads groups
_BLOCK = r"vit\.blocks\.(\d+)\."


class EncoderOutput(NamedTuple):
    """``x``: ``[B, 1 + n, D]`` after the final norm (cls first; n = N, or |V| in visible mode).

    ``hidden``: one ``[B, 1 + n, D]`` per requested layer, in the requested order; layer 0 is
    the input of block 1 (after pos add and mask-token substitution), layer l the output of
    block l before the final norm.
    """

    x: torch.Tensor
    hidden: list[torch.Tensor]


def visible_ids(mask: torch.Tensor, num_visible: int | None = None) -> torch.Tensor:
    """Indices of the visible patches of each sample, ascending.

    Args:
        mask: bool ``[B, N]``, True = masked; every row must mask the same number of patches.
        num_visible: |V| when the caller already knows it (skips the check and its host sync).

    Returns:
        long ``[B, |V|]``.

    Raises:
        ValueError: when the per-sample masked counts differ.
    """
    if num_visible is None:
        num_visible = _equal_visible_count(mask)
    # A stable sort of 0 (visible) before 1 (masked) keeps the visible indices in raster order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]


def _equal_visible_count(mask: torch.Tensor) -> int:
    if mask.shape[0] == 0:
        return 0
    known = getattr(mask, "visible_count", None)  # counted on the host copy (engine.setup.prepare_batch)
    if known is not None:
        return known
    counts = mask.sum(dim=1)
    lo, hi = torch.stack([counts.min(), counts.max()]).tolist()  # one host sync: shapes depend on it
    if lo != hi:
        raise ValueError(
            "visible-token encoding gathers [B, |V|, D] and needs the same number of masked patches "
            f"in every sample; got counts from {lo} to {hi}. Use a mask generator with an exact "
            "count (docs/methods.md §6.4)."
        )
    return mask.shape[1] - lo


def compile_blocks(module: nn.Module) -> int:
    """Compile every transformer block of ``module`` in place (regional ``torch.compile``).

    ``nn.Module.compile`` keeps parameter names and state-dict keys, so checkpoints, DeepSpeed
    and activation checkpointing (which wraps the compiled block's call) see the same module.
    One compiled graph serves every block of the same shape. Returns the number of blocks.
    """
    from timm.models.vision_transformer import Block

    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.compile(dynamic=False)
    return len(blocks)


def run_blocks(
    blocks: Iterable[nn.Module],
    x: torch.Tensor,
    keep: set[int],
    checkpointing: bool = False,
    **block_kwargs: Any,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Apply ``blocks`` in order, keeping the states of the layers in ``keep``.

    Layer 0 is ``x`` itself, layer l the output of block l. Activation checkpointing wraps each
    block (non-reentrant); states are returned, never captured with hooks (docs/methods.md §6.5).
    """
    states = {0: x} if 0 in keep else {}
    for i, blk in enumerate(blocks):
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False, **block_kwargs)
        else:
            x = blk(x, **block_kwargs)
        if i + 1 in keep:
            states[i + 1] = x
    return x, states


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """MAE initialisation (docs/methods.md §1.2): xavier-uniform Linear with zero bias, LayerNorm 1/0,
    a patch-embed conv initialised as a flattened Linear, cls and mask tokens N(0, 0.02)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("patch_embed.proj.weight"):
            nn.init.xavier_uniform_(p.view(p.shape[0], -1))
        elif name.split(".")[-1] in ("cls_token", "mask_token"):
            nn.init.normal_(p, std=0.02)


def beit_trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """BEiT / SimMIM / CAE ``trunc_normal_``: cut at +-1 sigma (``a=-std, b=std``), not timm's
    +-2 absolute, so the effective std is ~0.54 std (~0.0108 for 0.02; docs/methods.md §1.2)."""
    return nn.init.trunc_normal_(t, std=std, a=-std, b=std)


@torch.no_grad()
def beit_init_(encoder: ViTEncoder, std: float = 0.02) -> None:
    """BEiT-style encoder init as SimMIM's and CAE's code (docs/methods.md §1.2).

    Every Linear and Conv2d weight (the patch embedding included) and the cls / mask tokens get
    :func:`beit_trunc_normal_`; biases 0; LayerNorm 1/0; then block l's attention ``proj`` and
    MLP ``fc2`` weights are divided by ``sqrt(2 l)`` (BEiT ``fix_init_weight``). The fixed sin-cos
    table and the (zero) relative position bias table are left alone.
    """
    for m in encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            beit_trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in encoder.named_parameters():
        if name.split(".")[-1] in ("cls_token", "mask_token"):
            beit_trunc_normal_(p, std)
    for i, blk in enumerate(encoder.vit.blocks):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))


def _timm_kwargs(cfg: ModelConfig, dim: int, depth: int, heads: int) -> dict[str, Any]:
    common = dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=4.0, qkv_bias=True, drop_path_rate=cfg.drop_path, num_classes=0,
        # 0.0 = off: timm.create_model drops None kwargs, which would let a registered default
        # (Beit's init_values=0.1) leak in; both timm block types treat 0.0 as no layer-scale.
        init_values=cfg.layer_scale or 0.0,
    )  # fmt: skip
    if cfg.arch == "vit":
        if cfg.rel_pos_bias != "none":
            raise ValueError("model.rel_pos_bias: relative position bias needs model.arch=beit")
        return {**common, "global_pool": "token", "pos_embed": "learn" if cfg.abs_pos != "none" else "none"}
    # Beit: q/v bias only (k bias is a zero buffer), layer-scale gammas, optional shared RPB.
    return {
        **common,
        "global_pool": "",  # keeps the final norm over all tokens (fc_norm unused)
        "use_abs_pos_emb": cfg.abs_pos != "none",
        "use_rel_pos_bias": False,
        "use_shared_rel_pos_bias": cfg.rel_pos_bias == "shared",
    }


class ViTEncoder(nn.Module):
    """A timm ViT / BEiT encoding all tokens, visible tokens only, or tokens with a mask token.

    Args:
        cfg: the recipe's ``model`` section.
        mask_token: create the learned ``[1, 1, D]`` mask token (needed by mode "mask_token";
            left out otherwise so that no parameter goes without a gradient).

    Attributes:
        vit: the timm model (``VisionTransformer`` for arch "vit", ``Beit`` for "beit").
        timm_name / timm_kwargs: ``timm.create_model(timm_name, **timm_kwargs)`` builds a model
            whose ``state_dict`` keys and shapes equal ``vit``'s.
        grid: (h, w) patches; num_patches N; embed_dim D; depth L; patch_size p.
        grad_checkpointing: checkpoint each block (set by :meth:`set_grad_checkpointing`).
    """

    def __init__(self, cfg: ModelConfig, mask_token: bool = False) -> None:
        super().__init__()
        from timm.models.beit import Beit
        from timm.models.vision_transformer import VisionTransformer

        dim, depth, heads = SIZES[cfg.size]
        dim, depth = cfg.embed_dim or dim, cfg.depth or depth
        heads = cfg.num_heads or heads
        if dim % heads:
            raise ValueError(f"model.num_heads: {heads} does not divide embed_dim {dim}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(
                f"model.img_size: {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        self.arch = cfg.arch
        self.timm_kwargs = _timm_kwargs(cfg, dim, depth, heads)
        self.timm_name: str = TIMM_NAMES[cfg.arch].get(cfg.size) or TIMM_NAMES[cfg.arch]["base"]
        # typed Any: timm's VisionTransformer / Beit internals are touched only in this adapter
        self.vit: Any = (VisionTransformer if cfg.arch == "vit" else Beit)(**self.timm_kwargs)
        self.embed_dim, self.depth, self.num_heads, self.patch_size = dim, depth, heads, cfg.patch_size
        self.grid = (cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.grad_checkpointing = False
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        if self.vit.pos_embed is not None:
            # Fixed sin-cos table (docs/methods.md §1.2), also for Beit when abs_pos = sincos;
            # MAE or CAE layout.
            layout = cae_sincos_pos_embed if cfg.sincos_layout == "cae" else mae_sincos_pos_embed
            table = layout(dim, self.grid, cls_token=True)
            self.vit.pos_embed.data.copy_(table.unsqueeze(0))
            self.vit.pos_embed.requires_grad_(False)
        # MAE-family encoders start as MAE's code; BEiT-style ones as SimMIM's / CAE's (timm's
        # own Beit init cuts its trunc-normal at +-2 absolute, about twice their scale).
        (mae_init_ if cfg.arch == "vit" else beit_init_)(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    def _embed(self, images: torch.Tensor, mask: torch.Tensor | None, mode: Mode) -> torch.Tensor:
        """Patch embed, mask handling, pos add, cls prepend -> ``[B, 1 + n, D]``."""
        x = self.vit.patch_embed(images)  # [B, N, D]
        if mode == "mask_token":
            # SimMIM (docs/methods.md §1.4): x <- x * (1 - w) + m * w, before pos add and blocks.
            assert mask is not None and self.mask_token is not None  # checked by _check
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        pos = self.vit.pos_embed  # [1, 1 + N, D] or None
        if pos is not None:
            x = x + pos[:, 1:]
        if mode == "visible":
            # MAE: pos is added before the masked tokens are dropped (models_mae.forward_encoder).
            assert mask is not None  # checked by _check
            ids = visible_ids(mask)
            x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = self.vit.cls_token if pos is None else self.vit.cls_token + pos[:, :1]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        mode: Mode = "all",
        return_layers: Sequence[int] = (),
    ) -> EncoderOutput:
        """Encode images.

        Args:
            images: float ``[B, 3, H, W]`` (ImageNet-normalised).
            mask: bool ``[B, N]``, True = masked; required by modes "visible" and "mask_token".
            mode: "visible" drops masked patches (equal masked counts per sample needed);
                "mask_token" substitutes the learned mask token at masked patches; "all" encodes
                every patch unmasked (evaluation, teachers) and takes no mask.
            return_layers: layers to return, 0 = input of block 1 ... L = output of block L.

        Returns:
            :class:`EncoderOutput` with ``x`` ``[B, 1 + n, D]`` and the requested hidden states.
        """
        self._check(images, mask, mode, return_layers)
        x = self._embed(images, mask, mode)
        kwargs = {}
        if self.arch == "beit":
            rpb = self.vit.rel_pos_bias
            kwargs["shared_rel_pos_bias"] = rpb() if rpb is not None else None
        x, states = run_blocks(self.vit.blocks, x, set(return_layers), self.grad_checkpointing, **kwargs)
        return EncoderOutput(self.vit.norm(x), [states[i] for i in return_layers])

    def _check(
        self, images: torch.Tensor, mask: torch.Tensor | None, mode: Mode, layers: Sequence[int]
    ) -> None:
        if mode not in ("visible", "mask_token", "all"):
            raise ValueError(f"mode: expected 'visible', 'mask_token' or 'all', got {mode!r}")
        if (mask is None) != (mode == "all"):
            raise ValueError(
                f"mode {mode!r}: " + ("takes no mask" if mode == "all" else "needs a mask [B, N]")
            )
        if mask is not None and (
            mask.dtype != torch.bool or mask.shape != (images.shape[0], self.num_patches)
        ):
            raise ValueError(
                f"mask: expected bool [B, N] = [{images.shape[0]}, {self.num_patches}], "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        if mode == "mask_token" and self.mask_token is None:
            raise ValueError("mode 'mask_token': build the encoder with ViTEncoder(cfg, mask_token=True)")
        if mode == "visible" and getattr(self.vit, "rel_pos_bias", None) is not None:
            raise ValueError("mode 'visible': a relative position bias needs the full token grid")
        bad = [i for i in layers if not 0 <= i <= self.depth]
        if bad:
            raise ValueError(f"return_layers: {bad} outside 0..{self.depth}")

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's final LayerNorm on ``[B, n, D]`` (MR-MAE applies it to fused layers)."""
        return self.vit.norm(x)

    def no_weight_decay(self) -> set[str]:
        """Token / table names (relative to this module) that fine-tuning keeps out of weight decay."""
        names = {"vit.cls_token", "vit.pos_embed", "mask_token"}
        names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return {n for n, _ in self.named_parameters() if n in names}

    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict[str, Any]:
        """timm ``group_matcher`` for ``timm.optim.param_groups_layer_decay``.

        Gives MAE ``util/lr_decay`` numbering: 0 = patch embed, cls, pos, mask token; block k ->
        k + 1; every unmatched name (final norm, shared rel-pos bias as BEiT, decoders, heads)
        -> L + 1. timm's own matchers put ``norm`` in block L and Beit's ``rel_pos_bias`` in 0.

        Args:
            coarse: ignored (kept for timm's signature).
            prefix: the encoder's attribute path in the model being grouped, e.g. "encoder.".
        """
        p = re.escape(prefix)
        return {"stem": rf"^{p}{_STEM}", "blocks": [(rf"^{p}{_BLOCK}", None)]}

    def layer_id(self, name: str) -> int:
        """Layer-decay id of parameter ``name`` (relative to this module), as :meth:`group_matcher`."""
        if re.match(rf"^{_STEM}", name):
            return 0
        block = re.match(rf"^{_BLOCK}", name)
        return int(block.group(1)) + 1 if block else self.depth + 1
