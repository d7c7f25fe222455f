"""DinoRankCLIP model: an open_clip trunk with the dual-branch student and the gated fusion module.

The model returns embeddings, never losses. The frozen teacher is not part of it: the trainer runs the
teacher (or reads cached features) and hands its tokens to the objective, and to the model only when
``fusion.injection_source`` is ``teacher``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .fusion import ConflictGate, MultiScaleFusion
from .student import StudentImageBranch, StudentTextBranch
from .trunk import TrunkSpec, build_trunk

__all__ = ["DinoRankCLIP", "TeacherGeometry", "build_model"]


@dataclass(frozen=True)
class TeacherGeometry:
    """Shape facts about the teacher space that the student and fusion are built for.

    Stored in every checkpoint so a model can be rebuilt without the teacher.
    """

    dim: int  # Dt, width of the teacher space (the PCA width when features come from a cache)
    grid: tuple[int, int]  # patch grid (h, w) at the teacher's input size
    blocks: tuple[int, ...]  # resolved teacher block indices, one token grid each
    depth: int  # number of teacher blocks
    image_size: int  # teacher (and student) input size in pixels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherGeometry:
        return cls(
            dim=int(data["dim"]),
            grid=tuple(int(v) for v in data["grid"]),
            blocks=tuple(int(v) for v in data["blocks"]),
            depth=int(data["depth"]),
            image_size=int(data["image_size"]),
        )


class DinoRankCLIP(nn.Module):
    """CLIP trunk plus optional DINOv3 injection.

    Args:
        cfg: the run configuration.
        geometry: teacher-space geometry; required unless ``cfg.fusion.variant`` is ``none``.
    """

    def __init__(self, cfg: Config, geometry: TeacherGeometry | None = None) -> None:
        super().__init__()
        self.trunk, self.trunk_spec = build_trunk(cfg.model)
        self.max_logit_scale = cfg.model.max_logit_scale
        self.injection_source = cfg.fusion.injection_source
        self.variant = cfg.fusion.variant
        self.geometry = geometry
        embed_dim = self.trunk_spec.embed_dim

        self.student_image: StudentImageBranch | None = None
        self.student_text: StudentTextBranch | None = None
        self.text_residual: nn.Linear | None = None
        self.fusion: MultiScaleFusion | None = None
        if cfg.fusion.enabled:
            if geometry is None:
                raise ValueError("fusion.variant != 'none' needs the teacher geometry (teacher or cache)")
            if self.injection_source == "student":
                self.student_image = StudentImageBranch(
                    cfg.student,
                    image_size=geometry.image_size,
                    teacher_dim=geometry.dim,
                    teacher_grid=geometry.grid,
                    teacher_blocks=list(geometry.blocks),
                    teacher_depth=geometry.depth,
                )
            self.fusion = MultiScaleFusion(
                cfg.fusion, in_dim=geometry.dim, num_levels=len(geometry.blocks), grid=geometry.grid,
                embed_dim=embed_dim,
            )
            if cfg.fusion.variant != "image_only":
                self.student_text = StudentTextBranch(embed_dim, geometry.dim)
                self.text_residual = nn.Linear(geometry.dim, embed_dim)
                nn.init.zeros_(self.text_residual.weight)
                nn.init.zeros_(self.text_residual.bias)

    @property
    def spec(self) -> TrunkSpec:
        return self.trunk_spec

    @property
    def gate(self) -> ConflictGate | None:
        return None if self.fusion is None else self.fusion.gate

    def logit_scale(self) -> torch.Tensor:
        """Return the logit scale s = exp(log s), clamped to at most ``model.max_logit_scale``."""
        return self.trunk.logit_scale.exp().clamp(max=self.max_logit_scale)

    def clamp_logit_scale(self) -> None:
        """Clamp the stored log logit scale in place (called after every optimiser step)."""
        with torch.no_grad():
            self.trunk.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    # -----------------------------------------------------------------------------------------------------------------

    def encode_image_all(
        self,
        image: torch.Tensor,
        teacher_view: torch.Tensor | None = None,
        teacher_levels: tuple[torch.Tensor, ...] | None = None,
    ) -> dict[str, Any]:
        """Encode images and return every image-side output (see :meth:`forward`)."""
        z_clip = F.normalize(self.trunk.encode_image(image), dim=-1)
        out: dict[str, Any] = {
            "clip_image_features": z_clip,
            "image_features": z_clip,
            "image_gate": None,
            "image_residual": None,
            "student_patch_levels": None,
            "student_global": None,
        }
        if self.fusion is None:
            return out
        if self.student_image is not None:
            if teacher_view is None:
                raise ValueError(
                    "this model injects through the student and needs teacher_view, the image at the teacher's "
                    "size (batch['teacher_view'] in training)"
                )
            levels, student_global = self.student_image(teacher_view)
            out["student_patch_levels"] = levels
            out["student_global"] = student_global
        else:
            if teacher_levels is None:
                raise ValueError("fusion.injection_source='teacher' needs teacher tokens at every forward")
            levels = teacher_levels
        fused, gate, residual = self.fusion(z_clip, levels)
        out.update(image_features=fused, image_gate=self._gate_output(gate), image_residual=residual)
        return out

    def _gate_output(self, gate: torch.Tensor) -> torch.Tensor | None:
        # The no_gate variant's g is the constant 1; reporting None keeps a constant out of the gate L1 penalty.
        return gate if self.fusion.gate.enabled else None

    def encode_text_all(self, text: torch.Tensor) -> dict[str, Any]:
        """Encode token ids [B, L] and return every text-side output (see :meth:`forward`)."""
        t_raw = self.trunk.encode_text(text)
        t_clip = F.normalize(t_raw, dim=-1)
        out: dict[str, Any] = {"clip_text_features": t_clip, "text_features": t_clip, "text_gate": None,
                               "text_student": None}
        if self.student_text is None:
            return out
        text_student = self.student_text(t_clip)
        fused, gate = self.fusion.gate(t_clip, self.text_residual(text_student))
        out.update(text_features=fused, text_gate=self._gate_output(gate), text_student=text_student)
        return out

    def encode_image(self, image, teacher_view=None, teacher_levels=None) -> torch.Tensor:
        """Return fused, L2-normalised image embeddings [B, E]."""
        return self.encode_image_all(image, teacher_view, teacher_levels)["image_features"]

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Return fused, L2-normalised text embeddings [B, E]."""
        return self.encode_text_all(text)["text_features"]

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        teacher_view: torch.Tensor | None = None,
        teacher_levels: tuple[torch.Tensor, ...] | None = None,
    ) -> dict[str, Any]:
        """Encode a batch of pairs.

        Args:
            image: [B, 3, H, W] trunk view, normalised with the trunk's mean and std.
            text: [B, L] token ids.
            teacher_view: [B, 3, Ht, Wt] in [0, 1], the student's (and teacher's) view; needed when the
                student injects.
            teacher_levels: S teacher token grids [B, P, Dt]; needed when the teacher injects directly.

        Returns:
            A dict with ``image_features``, ``text_features`` (fused, unit norm, [B, E]),
            ``clip_image_features``, ``clip_text_features`` (trunk, unit norm), ``logit_scale`` (clamped),
            ``image_gate``/``text_gate`` ([B, E]; None without fusion or with the ``no_gate`` variant),
            ``image_residual`` ([B, E] or None),
            ``student_patch_levels`` (S x [B, P, Dt] or None), ``student_global`` ([B, Dt] or None) and
            ``text_student`` ([B, Dt] or None).
        """
        out = self.encode_image_all(image, teacher_view, teacher_levels)
        out.update(self.encode_text_all(text))
        out["logit_scale"] = self.logit_scale()
        return out


def build_model(cfg: Config, geometry: TeacherGeometry | None) -> DinoRankCLIP:
    """Build the model for ``cfg``; ``geometry`` comes from the teacher, its cache or a checkpoint."""
    return DinoRankCLIP(cfg, geometry if cfg.fusion.enabled else None)
