"""Where training gets teacher features from: the frozen teacher run online on each batch."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import Config
from ..models.dinorankclip import TeacherGeometry
from ..teacher import TeacherOutput, build_teacher, teacher_input_size

__all__ = ["OnlineTeacher", "build_teacher_source"]

logger = logging.getLogger(__name__)


class OnlineTeacher:
    """Run the frozen DINOv3 teacher on ``batch["teacher_view"]`` at every step."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        if cfg.teacher.weights is None:
            raise FileNotFoundError(
                "teacher.weights is not set; give a local DINOv3 weights file (Meta .pth, timm .safetensors/.pth "
                "or a Hugging Face folder), teacher.cache=<folder>, or teacher.weights=random for tests"
            )
        self.teacher = build_teacher(
            cfg.teacher.name,
            cfg.teacher.weights,
            blocks=tuple(cfg.teacher.blocks),
            autocast_bf16=cfg.teacher.autocast,
            **cfg.teacher.model_kwargs,
        ).to(device)
        self.device = device
        patch = self.teacher.patch_size
        height, width = teacher_input_size(cfg.teacher.image_size, cfg.teacher.image_size, patch)
        if height != width:
            raise ValueError(f"teacher.image_size={cfg.teacher.image_size} maps to a non-square input {height}x{width}")
        self.geometry = TeacherGeometry(
            dim=self.teacher.embed_dim,
            grid=(height // patch, width // patch),
            blocks=tuple(self.teacher.blocks),
            depth=self.teacher.num_blocks,
            image_size=height,
        )

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        return self.teacher(batch["teacher_view"].to(self.device, non_blocking=True))


def build_teacher_source(cfg: Config, device: torch.device) -> tuple[OnlineTeacher | None, TeacherGeometry | None]:
    """Return the teacher feature source and the teacher geometry, or (None, None) without injection."""
    if not cfg.needs_teacher:
        return None, None
    source = OnlineTeacher(cfg, device)
    logger.info("Teacher %s online: width %d, grid %s, blocks %s", cfg.teacher.name, source.geometry.dim,
                source.geometry.grid, source.geometry.blocks)
    return source, source.geometry
