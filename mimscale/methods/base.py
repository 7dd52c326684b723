"""The seam between a method and the engine.

A method is an ``nn.Module`` built from a :class:`~mimscale.config.Recipe`. The engine calls
``forward(batch, mask, targets)`` and only reads ``MethodOutput.loss`` (and logs ``metrics``);
it never branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from mimscale.config import Recipe
    from mimscale.models.vit import ViTEncoder


class MethodOutput(NamedTuple):
    """What a method returns. ``metrics`` holds detached scalars (loss terms etc.).

    ``aux`` carries tensors for plug-ins, never read by the engine. Methods with
    ``feeds_mask_tokens`` fill it when ``return_stack_hidden`` is set (MTO, docs/methods.md §5.1):
    ``aux["stack_hidden"]``: the ``L + 1`` states of the stack that carries mask tokens, each
    ``[B, N, D]`` (patch rows only, raster order; entry 0 enters block 1, entry l leaves block l);
    ``aux["stack_mask"]``: bool ``[B, N]``, True = the row is a mask token (= the batch mask).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    aux: Mapping[str, Any] = MappingProxyType({})  # immutable empty default, never shared state


class Reconstruction(NamedTuple):
    """What a pixel-reconstruction method predicts for a few images (for pictures, no gradient).

    ``images``: the ImageNet-normalised input ``[B, 3, H, W]``; ``mask``: bool ``[B, N]``, True =
    masked (the mask the prediction was made under); ``pred``: the predicted image ``[B, 3, H, W]``
    in the same normalised space (per-patch normalised targets mapped back with each patch's
    own mean and std, as MAE's visualisation does).
    """

    images: torch.Tensor
    mask: torch.Tensor
    pred: torch.Tensor


class Method(nn.Module):
    """Base class of every pre-training method.

    Class attributes describe what the method needs so the engine and the recipe validator can
    act without knowing the method:

    - ``Config``: the dataclass of the method's own recipe section (keyed by the method name).
    - ``num_views``: augmented views it consumes (``batch["images"]`` has that many entries).
    - ``feeds_mask_tokens``: mask tokens go through a transformer stack (MTO can attach).
    - ``needs_equal_mask_count``: visible tokens are gathered to ``[B, |V|, D]``.

    Batch contract (built by the engine from the data pipeline):
        ``batch["images"]``: list of float ``[B, 3, H, W]``, ImageNet-normalised on device.
        ``batch["views"]``: the same views as uint8 ``[B, 3, H, W]`` (teachers renormalise).
        ``batch["labels"]``: long ``[B]`` (-1 when unlabeled); ``batch["keys"]``: list[str].
        ``mask``: bool ``[B, N]``, ``True = masked`` (defined once, never inverted).
        ``batch["mask_noise"]``: float ``[B, N]`` uniform per sample, laid out as ``mask``: the
        randomness of a mask a method completes on the device (:mod:`mimscale.masking`).
        ``targets``: teacher outputs or ``None``.
    """

    Config: ClassVar[type]
    num_views: ClassVar[int] = 1
    feeds_mask_tokens: ClassVar[bool] = False
    needs_equal_mask_count: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # the engine builds mimscale.teachers.build_provider(recipe)
    can_predict: ClassVar[bool] = False  # has a classifier: :meth:`predict` (eval.top1)
    reconstructs_pixels: ClassVar[bool] = False  # :meth:`reconstruct` (reconstruction pictures)
    encoder: ViTEncoder
    # Draws a mask from batch["mask_noise"] (MR-MAE focused sampling, LC-MAE's second view): such a
    # run does not resume a checkpoint of another masking.MASK_STREAMS version.
    uses_mask_noise: bool = False
    # Set by a plug-in (MTO) to receive the mask-token stack's hidden states in ``aux``.
    return_stack_hidden: bool = False

    def __init__(self, recipe: Recipe | None = None) -> None:
        """Subclasses are built from the validated recipe: ``METHODS[name](recipe)``."""
        super().__init__()
        # Plug-ins attached by name (MTO); :meth:`finish` runs them on every forward's output.
        self.plugins = nn.ModuleDict()

    @classmethod
    def config_of(cls, recipe: Recipe) -> Any:
        """The recipe's section for this method (its ``Config``), as the registry validated it."""
        cfg = recipe.method_cfg
        if not isinstance(cfg, cls.Config):
            raise TypeError(
                f"{cls.__name__}: recipe.method_cfg is {type(cfg).__name__}, expected "
                f"{cls.Config.__name__}; load recipes through mimscale.registry"
            )
        return cfg

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Raise ``RecipeError`` (naming the key) for recipes this method cannot run."""

    def forward(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> MethodOutput:
        raise NotImplementedError

    def finish(self, out: MethodOutput) -> MethodOutput:
        """Every ``forward`` returns through here: each attached plug-in adds its terms.

        Args:
            out: the method's own output (with ``aux`` filled when ``return_stack_hidden``).

        Returns:
            The output after every plug-in in :attr:`plugins`, in attachment order.
        """
        for plugin in self.plugins.values():
            out = plugin(out)
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` for normalised images ``[B, 3, H, W]`` (methods with ``can_predict``)."""
        raise NotImplementedError(f"{type(self).__name__} has no classifier")

    def reconstruct(self, batch: dict[str, Any], mask: torch.Tensor, targets: Any = None) -> Reconstruction:
        """The method's pixel prediction for ``batch`` under ``mask`` (methods with
        ``reconstructs_pixels``), by the same code path as :meth:`forward`; the caller runs it
        under ``torch.no_grad()`` and on every rank (ZeRO-3 gathers parameters collectively).

        Args:
            batch, mask, targets: as :meth:`forward` (``mask`` may hold R masks per sample; the
                first of each sample's masks is used).
        """
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct pixels")

    def flops_per_image(self) -> float | None:
        """Forward FLOPs per image (for MFU); ``None`` when the method does not count them."""
        return None

    def train_flops_per_image(self) -> float | None:
        """FLOPs per image of a training step; by default 3x forward (backward ~ 2x forward)."""
        fwd = self.flops_per_image()
        return None if fwd is None else 3.0 * fwd

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. EMA updates)."""

    def set_total_steps(self, total_steps: int) -> None:
        """Called once by the engine, before training or resuming, with the run's optimizer-step
        count (the horizon of per-step schedules such as LC-MAE's momentum)."""

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay grouping for ``timm.optim.param_groups_layer_decay`` (MAE numbering:
        encoder embeddings 0, encoder block k -> k + 1, everything else -> L + 1)."""
        return self.encoder.group_matcher(coarse, prefix="encoder.")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing on every submodule that supports it (encoder, decoders)."""
        for m in self.modules():
            setter = getattr(m, "set_grad_checkpointing", None) if m is not self else None
            if callable(setter):
                setter(enable)
