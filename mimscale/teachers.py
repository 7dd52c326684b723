"""Frozen teachers (open_clip CLIP towers, timm ViTs) and the precomputed-target reader.

Teachers are built outside the student's DeepSpeed engine, frozen, in eval mode; their outputs
enter a method as tensors. Import-light: open_clip / timm are imported when a teacher is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TeacherConfig:
    """The ``teacher:`` recipe section (used by methods with ``needs_teacher``)."""

    enabled: bool = False
