"""Frozen teachers (open_clip CLIP towers, timm ViTs) as target providers (docs/methods.md §1.8, §6.1).

- :mod:`mimscale.teachers.weights` — where the weights are (a file, the local open_clip / Hugging
  Face cache) and, for a weights file, the architecture its tensors describe.
- :mod:`mimscale.teachers.towers` — a timm / open_clip tower built and loaded from that, wrapped
  as :class:`mimscale.models.teacher_vit.TeacherViT`.
- :mod:`mimscale.teachers.provider` — the frozen provider the engine calls per micro-batch.

Import-light: open_clip, timm and deepspeed are imported when a teacher is built.
"""

from mimscale.config import TeacherConfig
from mimscale.teachers.provider import (
    TeacherProvider,
    TeacherTargets,
    build_provider,
    check_recipe,
    teacher_image_size,
    teacher_out_dim,
)
from mimscale.teachers.towers import TINY_TEXT_CFG
from mimscale.teachers.weights import FileArch, read_file_arch, resolve_weights

__all__ = [
    "TINY_TEXT_CFG",
    "FileArch",
    "TeacherConfig",
    "TeacherProvider",
    "TeacherTargets",
    "build_provider",
    "check_recipe",
    "read_file_arch",
    "resolve_weights",
    "teacher_image_size",
    "teacher_out_dim",
]
