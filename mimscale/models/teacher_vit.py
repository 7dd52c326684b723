"""Frozen teacher towers: one module shape over an open_clip CLIP vision tower or a timm ViT.

This is the adapter that reaches into open_clip / timm internals for teachers (the student's is
:mod:`mimscale.models.vit`). :class:`TeacherViT` re-owns the parts of the source model it needs,
so every parameter is used only inside the ``forward`` of the module that owns it; that is what
DeepSpeed ZeRO-3 (the offloaded teacher) needs to gather weights with its module hooks.

Token features follow docs/methods.md §1.8 / §2.6: the chosen block's output, the final norm
(``ln_post`` / timm ``norm``) applied to **every** token (stock CLIP applies it to the class
token only), and optionally open_clip's ``proj`` (768 -> 512 for CLIP-B/16) on every token.
The last block's [CLS] attention comes from the same forward: only that block is computed
with explicit attention weights, every other block keeps the fused attention kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn


class TowerOutput(NamedTuple):
    """``tokens``: ``[B, 1 + N, C]`` (cls first, patches in raster order).

    ``cls_attn``: float32 ``[B, N]``, the last computed block's attention from [CLS] to each
    patch, averaged over heads and renormalised to sum to 1 over patches; None unless asked.
    """

    tokens: torch.Tensor
    cls_attn: torch.Tensor | None


class _ClipEmbed(nn.Module):
    """open_clip's ``VisionTransformer._embeds`` as a module owning its parameters."""

    def __init__(self, visual: Any) -> None:
        super().__init__()
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding  # [C]
        self.positional_embedding = visual.positional_embedding  # [1 + N, C]
        self.ln_pre = visual.ln_pre

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, N, C]
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)


class _TimmEmbed(nn.Module):
    """timm ``VisionTransformer`` patch embed + cls + pos (+ ``norm_pre``) as one module."""

    def __init__(self, vit: Any) -> None:
        super().__init__()
        if getattr(vit, "reg_token", None) is not None or getattr(vit, "no_embed_class", False):
            raise ValueError(
                "teacher.model: timm ViTs with register tokens or no_embed_class are not supported"
            )
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("teacher.model: the timm teacher needs a class token")
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token  # [1, 1, C]
        self.pos_embed = vit.pos_embed  # [1, 1 + N, C]
        self.norm_pre = vit.norm_pre

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # [B, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.norm_pre(x + self.pos_embed.to(x.dtype))


class _Proj(nn.Module):
    """open_clip's output projection ``x @ proj`` (``proj``: ``[C, C_out]``) as a module."""

    def __init__(self, proj: nn.Parameter) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.to(x.dtype)


def _clip_block_with_attn(blk: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip ``ResidualAttentionBlock.forward`` with the head-averaged attention returned."""
    y = blk.ln_1(x)
    out, w = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)  # w: [B, L, L]
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, w


def _timm_block_with_attn(blk: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Block.forward`` (eval) with an explicit softmax so the weights can be returned."""
    a = blk.attn
    y = blk.norm1(x)
    b, n, _ = y.shape
    q, k, v = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, L, L]
    o = a.proj(a.norm((attn @ v).transpose(1, 2).reshape(b, n, a.attn_dim)))
    x = x + blk.drop_path1(blk.ls1(o))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, attn.mean(dim=1)


class TeacherViT(nn.Module):
    """A frozen ViT teacher: embed -> blocks[:layer] -> (final norm) -> (proj), all tokens kept.

    Build it with :meth:`from_open_clip` or :meth:`from_timm`; it is put in eval mode with
    ``requires_grad=False`` on every parameter.

    Attributes:
        kind: "open_clip" or "timm". patch_size: p. grid: (h, w) tokens at ``img_size``.
        out_dim: channels of the returned tokens.
    """

    def __init__(
        self,
        kind: str,
        embed: nn.Module,
        blocks: list[nn.Module],
        norm: nn.Module | None,
        proj: nn.Module | None,
        patch_size: int,
        img_size: int,
        out_dim: int,
    ) -> None:
        super().__init__()
        self.kind, self.patch_size, self.img_size, self.out_dim = kind, patch_size, img_size, out_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm if norm is not None else nn.Identity()
        self.proj = proj if proj is not None else nn.Identity()
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> TeacherViT:
        """A teacher never leaves eval mode (no dropout, no drop-path), whatever its parent does."""
        return super().train(False)

    @classmethod
    def from_open_clip(cls, visual: Any, layer: int, norm: bool, proj: bool) -> TeacherViT:
        """Wrap ``open_clip``'s ``VisionTransformer`` (``model.visual``).

        Args:
            visual: the vision tower (its ``transformer`` must be batch-first, blocks standard).
            layer: number of blocks to run (1..depth).
            norm: apply ``ln_post`` to every token.
            proj: apply ``proj`` to every token (C -> output dim).
        """
        from open_clip.transformer import ResidualAttentionBlock

        blocks = list(visual.transformer.resblocks)[:layer]
        if not getattr(visual.transformer, "batch_first", True) or not all(
            type(b) is ResidualAttentionBlock for b in blocks
        ):
            raise ValueError(
                "teacher.model: only batch-first open_clip ViTs with standard blocks are supported"
            )
        if proj and visual.proj is None:
            raise ValueError("teacher.proj: this open_clip tower has no output projection")
        width = visual.conv1.out_channels
        return cls(
            "open_clip",
            _ClipEmbed(visual),
            blocks,
            visual.ln_post if norm else None,
            _Proj(visual.proj) if proj else None,
            patch_size=visual.patch_size[0],
            img_size=visual.image_size[0],
            out_dim=visual.proj.shape[1] if proj else width,
        )

    @classmethod
    def from_timm(cls, vit: Any, layer: int, norm: bool) -> TeacherViT:
        """Wrap a timm ``VisionTransformer`` (e.g. ``vit_base_patch16_224.dino``).

        Args:
            vit: the timm model (class token, absolute pos-embed including the class slot).
            layer: number of blocks to run (1..depth).
            norm: apply the final ``norm`` to every token.
        """
        return cls(
            "timm",
            _TimmEmbed(vit),
            list(vit.blocks)[:layer],
            vit.norm if norm else None,
            None,
            patch_size=vit.patch_embed.patch_size[0],
            img_size=vit.patch_embed.img_size[0],
            out_dim=vit.embed_dim,
        )

    def forward(self, images: torch.Tensor, cls_attn: bool = False) -> TowerOutput:
        """Teacher features of normalised images.

        Args:
            images: ``[B, 3, S, S]`` at ``img_size``, normalised with the teacher's mean/std.
            cls_attn: also return the last block's [CLS] -> patch attention.

        Returns:
            :class:`TowerOutput` with tokens ``[B, 1 + N, out_dim]``.
        """
        x = self.embed(images)
        last = len(self.blocks) - 1
        attn: Any = None
        for i, blk in enumerate(self.blocks):
            if cls_attn and i == last:
                fn = _clip_block_with_attn if self.kind == "open_clip" else _timm_block_with_attn
                x, w = fn(blk, x)  # w: [B, L, L]
                a = w[:, 0, 1:].float()
                attn = a / a.sum(dim=-1, keepdim=True)
            else:
                x = blk(x)
        return TowerOutput(self.proj(self.norm(x)), attn)
