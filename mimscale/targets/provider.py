"""The precomputed target provider: decodes the batch's stored teacher targets on the device.

It returns the same :class:`~mimscale.teachers.TeacherTargets` as the online provider for the
same view (bitwise for an ``fp32`` bank), so methods do not know which one they were given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mimscale.targets.bank import read_bank_manifest
from mimscale.targets.encoding import Pca, decode, parse_encoding

if TYPE_CHECKING:
    from mimscale.config import Recipe

__all__ = ["PrecomputedProvider", "build_precomputed_provider"]


class PrecomputedProvider:
    """Callable ``provider(batch) -> TeacherTargets`` reading ``batch["teacher"]``.

    Attributes:
        metadata: the bank's teacher identity, encoding, K and path (for the run's metadata).
    """

    def __init__(self, manifest: dict[str, Any], root: str, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.encoding = parse_encoding(manifest["encoding"])
        self._pca = None
        if self.encoding.pca_dim is not None:
            pca = Pca.from_json(manifest["pca"])
            self._pca = (torch.from_numpy(pca.basis).to(device), torch.from_numpy(pca.mean).to(device))
        self.metadata = {
            "source": "precomputed", "bank": root, "encoding": manifest["encoding"],
            "views_per_image": manifest["views_per_image"], "teacher": manifest["teacher_built"],
        }  # fmt: skip

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> Any:
        """Targets for the batch's rows: tokens ``[B, 1 + N, C_t]``, cls_attn ``[B, N]`` or None."""
        from mimscale.teachers import TeacherTargets

        stored = batch.get("teacher")
        if stored is None:
            raise ValueError("teacher.source is precomputed but the batch has no 'teacher' targets")
        codes = stored["codes"].to(self.device, non_blocking=True)
        scale = stored["scale"].to(self.device, non_blocking=True) if "scale" in stored else None
        tokens = decode(codes, scale, self._pca).to(self.dtype)
        attn = stored.get("cls_attn")
        return TeacherTargets(tokens, attn.to(self.device, non_blocking=True) if attn is not None else None)


def build_precomputed_provider(recipe: Recipe, device: torch.device) -> PrecomputedProvider:
    """The provider of ``recipe.teacher.bank``; tokens come out in the dtype the online teacher
    would give on ``device`` (``teacher.dtype``; auto: bf16 on GPU, fp32 on CPU)."""
    root, manifest = read_bank_manifest(recipe.teacher.bank)
    name = recipe.teacher.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    return PrecomputedProvider(manifest, str(root), device, dtype)
