"""Dual-branch lightweight student that carries the DINOv3 teacher's knowledge into the CLIP model.

* Image branch: a small timm ViT (ViT-Tiny by default) that reads the same view as the teacher. Its patch
  tokens from several depths are projected into the teacher's feature space; they are distilled from the
  teacher during training and feed the fusion module, so the teacher is not needed at inference.
* Text branch: a projection of the CLIP text embedding into the teacher's space, aligned during training
  with the teacher's global feature of the paired image.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, StudentConfig

__all__ = ["StudentImageBranch", "StudentTextBranch", "pair_blocks", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pair_blocks(teacher_blocks: list[int] | tuple[int, ...], teacher_depth: int, student_depth: int) -> list[int]:
    """Pick the student block for each teacher block at the same relative depth.

    Args:
        teacher_blocks: resolved (non-negative) teacher block indices.
        teacher_depth: number of teacher blocks.
        student_depth: number of student blocks.

    Returns:
        One non-negative student block index per teacher block.
    """
    return [max(0, round((b + 1) / teacher_depth * student_depth) - 1) for b in teacher_blocks]


class StudentImageBranch(nn.Module):
    """Small ViT whose multi-depth patch tokens are projected into the teacher's feature space.

    Args:
        cfg: student section of the config.
        image_size: input size in pixels (the teacher's view size).
        teacher_dim: width Dt of the teacher space.
        teacher_grid: patch grid (h, w) of the teacher at ``image_size``; student tokens are pooled to it.
        teacher_blocks: resolved teacher block indices, one student level per entry.
        teacher_depth: number of blocks in the teacher.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        *,
        image_size: int,
        teacher_dim: int,
        teacher_grid: tuple[int, int],
        teacher_blocks: list[int],
        teacher_depth: int,
    ) -> None:
        super().__init__()
        try:
            self.vit = timm.create_model(
                cfg.name, pretrained=False, num_classes=0, img_size=image_size, **cfg.model_kwargs
            )
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ConfigError(f"student.name={cfg.name!r} is not a timm architecture: {err}") from None
        if not hasattr(self.vit, "forward_intermediates"):
            raise ConfigError(f"student.name={cfg.name!r} has no forward_intermediates; use a timm ViT")
        depth = len(self.vit.blocks)
        if cfg.blocks is None:
            blocks = pair_blocks(teacher_blocks, teacher_depth, depth)
        else:
            blocks = [b % depth if -depth <= b < depth else b for b in cfg.blocks]
            if any(not 0 <= b < depth for b in blocks):
                raise ConfigError(f"student.blocks={cfg.blocks!r} is out of range for a {depth}-block student")
            if len(blocks) != len(teacher_blocks):
                raise ConfigError(
                    f"student.blocks has {len(blocks)} entries but teacher.blocks has {len(teacher_blocks)}; "
                    "give one student block per teacher block"
                )
        # Blocks past the deepest paired one never reach an output. Dropping them saves their compute and leaves
        # no parameter without gradient, which DistributedDataParallel only accepts with find_unused_parameters.
        self.vit.prune_intermediate_layers(blocks, prune_norm=False, prune_head=True)
        self.blocks = blocks
        self.teacher_grid = tuple(teacher_grid)
        width = self.vit.embed_dim
        self.proj = nn.ModuleList([nn.Linear(width, teacher_dim) for _ in blocks])
        self.global_proj = nn.Linear(width, teacher_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Encode a batch of teacher views.

        Args:
            images: [B, 3, H, W] in [0, 1], not normalised.

        Returns:
            ``patch_levels``: one [B, P, Dt] tensor per level on the teacher's grid, each projected from the
            student's LayerNorm-ed tokens of its block, and ``global_feature``: [B, Dt] from the mean of the last
            level's tokens.
        """
        x = (images - self.mean) / self.std
        # norm=True applies the final LayerNorm to every level, as the teacher's tokens are.
        feats = self.vit.forward_intermediates(
            x, indices=self.blocks, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        levels = []
        for proj, fmap in zip(self.proj, feats, strict=True):
            # fmap: [B, C, h, w] -> pooled to the teacher grid -> [B, P, C]
            if tuple(fmap.shape[-2:]) != self.teacher_grid:
                fmap = F.adaptive_avg_pool2d(fmap, self.teacher_grid)
            levels.append(proj(fmap.flatten(2).transpose(1, 2)))
        global_feature = self.global_proj(feats[-1].mean(dim=(2, 3)))
        return tuple(levels), global_feature


class StudentTextBranch(nn.Module):
    """Two-layer projection of the CLIP text embedding [B, E] into the teacher space [B, Dt]."""

    def __init__(self, embed_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, teacher_dim), nn.GELU(), nn.Linear(teacher_dim, teacher_dim))

    def forward(self, text_embedding: torch.Tensor) -> torch.Tensor:
        return self.net(text_embedding)
