"""Fine-tuning and linear probing as a *method*, trained by the same engine (no second loop).

``method: finetune`` builds the encoder from ``model:``, loads the pre-trained weights named by
``finetune.pretrained`` and adds a classifier (docs/methods.md §1.3):

- ``mode: finetune`` (MAE ``main_finetune.py``): mean of the patch tokens of the last block
  (before the final norm, which MAE deletes) -> ``fc_norm`` (LayerNorm) -> Linear (trunc-normal
  init, std 2e-5). RandAugment, RandomErasing, mixup / cutmix and label smoothing are timm's
  implementations; layer decay, drop path and the cosine schedule come from ``optim:`` and
  ``model:`` as for pre-training.
- ``mode: linprobe`` (MAE ``main_linprobe.py``): frozen encoder in eval mode, the class token
  after the final norm -> BatchNorm1d(affine=False) -> Linear (std 0.01); LARS via
  ``optim.optimizer: lars``.

The end-of-run top-1 on ``data.val`` is the evaluation hook with ``eval.top1: true``, which
calls :meth:`Finetune.predict`. ``mimscale finetune RECIPE`` (:func:`mimscale.cli.cmd_finetune`)
runs it (``--nproc`` ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import RecipeError
from mimscale.data.normalize import IMAGENET_MEAN, normalize_uint8
from mimscale.eval.linear import LinearProbeHead
from mimscale.methods.base import Method, MethodOutput
from mimscale.models.vit import ViTEncoder

if TYPE_CHECKING:
    from mimscale.config import Recipe

__all__ = ["Finetune", "load_pretrained_encoder"]


def load_pretrained_encoder(encoder: ViTEncoder, path: str) -> list[str]:
    """Load pre-trained weights into ``encoder`` (strict over the timm model's keys).

    Args:
        encoder: the fine-tuning encoder.
        path: a mimscale checkpoint (run / checkpoints / tag dir) or an exported
            ``.safetensors`` (timm keys, :mod:`mimscale.eval.export`).

    Returns:
        The checkpoint's encoder keys that the fine-tuning encoder does not have (``mask_token``).
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        vit = load_file(path)
        extra: list[str] = []
    else:
        from mimscale.eval.ckpt import method_state_dict

        sd = method_state_dict(path)
        vit = {k[len("encoder.vit.") :]: v for k, v in sd.items() if k.startswith("encoder.vit.")}
        extra = [k for k in sd if k.startswith("encoder.") and not k.startswith("encoder.vit.")]
        if not vit:
            raise RecipeError(f".finetune.pretrained: {path} holds no encoder weights")
    try:
        encoder.vit.load_state_dict(vit, strict=True)
    except RuntimeError as e:
        raise RecipeError(f".finetune.pretrained: {path} does not match model: ({e})") from None
    return extra


class Finetune(Method):
    """A classifier on the (pre-trained) encoder; ``self.encoder`` is what export writes.

    Args:
        recipe: ``model:`` sizes the encoder (``model.drop_path`` is the fine-tune drop path);
            ``finetune:`` (:class:`Finetune.Config`) the head, the data mixing and the loss.
    """

    @dataclass
    class Config:
        """The ``finetune:`` recipe section (defaults: MAE ViT-B fine-tuning, docs/methods.md §1.3)."""

        mode: Literal["finetune", "linprobe"] = "finetune"
        pretrained: str = ""  # mimscale checkpoint or exported .safetensors; "" = random init
        num_classes: int = 1000
        pool: Literal["avg", "cls"] = "avg"  # finetune: avg = mean patch tokens + fc_norm (MAE)
        head_init_std: float = 2e-5  # MAE FT 2e-5; CAE v2 0.001 (init scale); linprobe 0.01
        train_pos_embed: bool = True  # MAE FT loads the sin-cos table into a learnable pos_embed
        randaug: str = "rand-m9-mstd0.5-inc1"  # timm rand_augment_transform string; "" = off
        reprob: float = 0.25  # timm RandomErasing probability (mode pixel)
        mixup: float = 0.8  # timm Mixup alpha; 0 = off
        cutmix: float = 1.0  # timm Mixup cutmix alpha; 0 = off
        mixup_prob: float = 1.0
        mixup_switch_prob: float = 0.5
        label_smoothing: float = 0.1

    # The data pipeline still draws masks unless mask.kind is none; fine-tuning ignores them.
    feeds_mask_tokens: ClassVar[bool] = False
    can_predict: ClassVar[bool] = True

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        cfg: Finetune.Config = Finetune.config_of(recipe)
        self.cfg = cfg
        self.linprobe = cfg.mode == "linprobe"
        self.encoder = ViTEncoder(recipe.model)
        if cfg.pretrained:
            load_pretrained_encoder(self.encoder, cfg.pretrained)
        dim = self.encoder.embed_dim
        if self.linprobe:
            self.encoder.requires_grad_(False)
            self.head: nn.Module = LinearProbeHead(dim, cfg.num_classes, init_std=cfg.head_init_std)
        else:
            if self.encoder.vit.pos_embed is not None:
                self.encoder.vit.pos_embed.requires_grad_(cfg.train_pos_embed)
            if cfg.pool == "avg":  # MAE deletes the final norm and normalises the pooled token
                self.encoder.vit.norm.requires_grad_(False)
                self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, cfg.num_classes)
            nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
            nn.init.zeros_(self.head.bias)
        self._mixup: Any = None  # built lazily (timm)
        self._erase: Any = None
        self._randaug: Any = None

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Reject fine-tune recipes that cannot run, naming the key."""
        cfg = cls.config_of(recipe)
        if cfg.num_classes < 2:
            raise RecipeError(f".finetune.num_classes: expected >= 2, got {cfg.num_classes}")
        if cfg.mode == "linprobe" and (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.randaug or cfg.reprob > 0):
            raise RecipeError(
                ".finetune.mode: linprobe uses RRC + flip only; set mixup/cutmix/reprob 0, randaug ''"
            )
        if (cfg.mixup > 0 or cfg.cutmix > 0) and recipe.train.micro_batch % 2:
            raise RecipeError(".train.micro_batch: timm Mixup needs an even per-rank batch")

    def train(self, mode: bool = True) -> Finetune:
        """As ``nn.Module.train``, but a linear probe's frozen encoder stays in eval mode."""
        super().train(mode)
        if self.linprobe:
            self.encoder.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` -> ``[B, C]``."""
        if self.linprobe:
            with torch.no_grad():
                feats = self.encoder(images).x[:, 0]
            return self.head(feats)
        if self.cfg.pool == "avg":
            last = self.encoder(images, return_layers=[self.encoder.depth]).hidden[0]
            return self.head(self.fc_norm(last[:, 1:].mean(dim=1)))
        return self.head(self.encoder(images).x[:, 0])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits (the hook's ``eval.top1``); the caller sets eval mode."""
        return self.logits(images)

    def forward(
        self, batch: dict[str, Any], mask: torch.Tensor | None = None, targets: Any = None
    ) -> MethodOutput:
        """One fine-tuning step on ``batch["views"][0]`` and ``batch["labels"]``.

        Samples with label -1 (unlabeled) get no loss; a batch without labels gives a zero loss.

        Returns:
            ``MethodOutput(loss, {"loss_ce", "labeled"})``.
        """
        labels = batch["labels"]
        images = self._augment(batch)
        keep = (labels >= 0).float()
        y = labels.clamp_min(0)
        if self.training and not self.linprobe and (self.cfg.mixup > 0 or self.cfg.cutmix > 0):
            images, soft = self._mix(images, y)
            keep = keep * keep.flip(0)  # timm's batch mixup pairs sample i with B - 1 - i
            per_sample = torch.sum(-soft * F.log_softmax(self.logits(images).float(), dim=-1), dim=-1)
        else:
            smoothing = 0.0 if self.linprobe else self.cfg.label_smoothing
            per_sample = F.cross_entropy(self.logits(images).float(), y, reduction="none",
                                         label_smoothing=smoothing)  # fmt: skip
        loss = (per_sample * keep).sum() / keep.sum().clamp_min(1.0)
        return self.finish(MethodOutput(loss, {"loss_ce": loss.detach(), "labeled": keep.mean().detach()}))

    def _augment(self, batch: dict[str, Any]) -> torch.Tensor:
        """RandAugment on the uint8 view (timm, PIL), normalise, then RandomErasing (timm)."""
        images = batch["images"][0]
        if not self.training or self.linprobe:
            return images
        cfg = self.cfg
        if cfg.randaug:
            images = self._rand_augment(batch["views"][0]).to(images.device, images.dtype)
        if cfg.reprob > 0:
            if self._erase is None:
                from timm.data.random_erasing import RandomErasing

                self._erase = RandomErasing(cfg.reprob, mode="pixel", device=str(images.device))
            images = self._erase(images)
        return images

    def _rand_augment(self, views: torch.Tensor) -> torch.Tensor:
        # TODO(data): move into the data workers (per-view RandAugment) to keep it off the step.
        import numpy as np
        from PIL import Image

        if self._randaug is None:
            from timm.data import rand_augment_transform

            size = views.shape[-1]
            hparams = {
                "translate_const": int(size * 0.45),
                "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
            }
            self._randaug = rand_augment_transform(self.cfg.randaug, hparams)
        arr = views.permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([np.asarray(self._randaug(Image.fromarray(a))) for a in arr])
        return normalize_uint8(torch.from_numpy(out).permute(0, 3, 1, 2))

    def _mix(self, images: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mixup is None:
            from timm.data import Mixup

            c = self.cfg
            self._mixup = Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                                switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing,
                                num_classes=c.num_classes)  # fmt: skip
        return self._mixup(images, y)
