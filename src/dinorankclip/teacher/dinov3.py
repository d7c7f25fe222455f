"""Frozen DINOv3 teacher: a timm ``Eva`` model wrapped to stay in eval mode and return CLS and patch tokens.

DINOv3: Siméoni et al., "DINOv3", arXiv:2508.10104. timm 1.0.31 documents its port (``vit_*_patch16_dinov3``,
RoPE in ``timm/layers/pos_embed_sincos.py``) as numerically matching the original except for the RoPE periods,
which timm computes in float32 while the released checkpoints store them in bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# DINOv3 was trained on inputs normalised with the ImageNet statistics (timm's IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def teacher_input_size(h: int, w: int, patch_size: int) -> tuple[int, int]:
    """Return the size an image of ``h x w`` pixels is resized to before it enters the teacher.

    Rule: each side is rounded to the nearest multiple of ``patch_size`` (halves round up), with at least one patch
    per side, and the image is resized to that size (bilinear, antialiased). Sides that already are multiples are
    kept, so 224x224, 256x256 and 320x224 pass unchanged and 230x230 becomes 224x224.

    Resizing keeps the whole field of view, so teacher, student and trunk see the same image content and the
    teacher's patch grid covers exactly the trunk's view. Cropping would drop border content that a caption may
    describe, and padding would add patches with no content that the patch-token losses would count. The cost is an
    aspect-ratio change of at most ``patch_size / 2`` pixels per side (under 3.6% at 224 px with 16-pixel patches).

    Args:
        h: image height in pixels.
        w: image width in pixels.
        patch_size: the ViT patch size in pixels.

    Returns:
        ``(h', w')``, both positive multiples of ``patch_size``.
    """
    for name, value in (("h", h), ("w", w), ("patch_size", patch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"teacher_input_size: {name} must be a positive int, got {value!r}")

    def nearest_multiple(n: int) -> int:
        return max(1, math.floor(n / patch_size + 0.5)) * patch_size

    return nearest_multiple(h), nearest_multiple(w)


@dataclass
class TeacherOutput:
    """Teacher features for one batch, all float32 and without gradient.

    Attributes:
        cls: ``[B, D]`` CLS token of the deepest selected block, after the final LayerNorm.
        patch: ``[B, P, D]`` patch tokens of the deepest selected block, after the final LayerNorm, in row-major
            grid order (``P = grid_size[0] * grid_size[1]``). Register tokens and CLS are removed.
        patch_levels: one ``[B, P, D]`` tensor per selected block, shallowest first, each after the final
            LayerNorm as DINOv3's ``get_intermediate_layers(norm=True)`` does. ``patch_levels[-1]`` is ``patch``.
        grid_size: ``(h, w)`` patch grid, from the input size after ``teacher_input_size``.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    patch_levels: tuple[torch.Tensor, ...]
    grid_size: tuple[int, int]


def resolve_blocks(blocks: Sequence[int], num_blocks: int) -> tuple[int, ...]:
    """Turn block indices (negative counts from the end) into sorted non-negative ones, rejecting bad input."""
    if isinstance(blocks, int) or len(blocks) == 0:
        raise ValueError(f"teacher blocks must be a non-empty sequence of block indices, got {blocks!r}")
    resolved = []
    for index in blocks:
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"teacher block index must be an int, got {index!r}")
        absolute = index + num_blocks if index < 0 else index
        if not 0 <= absolute < num_blocks:
            raise ValueError(
                f"teacher block index {index} is out of range for a model with {num_blocks} blocks "
                f"(allowed: {-num_blocks} to {num_blocks - 1})"
            )
        resolved.append(absolute)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"teacher blocks {list(blocks)} name the same block twice (resolved: {resolved})")
    return tuple(sorted(resolved))


class DinoV3Teacher(nn.Module):
    """Frozen DINOv3 feature extractor.

    The wrapped model stays in eval mode even when a parent module calls ``train()``, because DINOv3 models can
    jitter RoPE coordinates and drop paths in train mode, and a teacher must give the same features for the same
    image. Its parameters are frozen at construction and ``forward`` runs under ``torch.no_grad``, so no gradient
    reaches them even if a caller later sets ``requires_grad``. The teacher owns the ImageNet normalisation and the
    input-size rule, so callers pass images in ``[0, 1]`` at any size.

    Args:
        model: a timm DINOv3 ``Eva`` model with its weights loaded.
        blocks: block indices whose patch tokens are returned (negative counts from the end).
        autocast_bf16: on CUDA devices with bfloat16 support, run the model under bfloat16 autocast.
        model_name: the timm model name, kept for logs and cache manifests.
        weights: where the weights came from (a path or ``"random"``), kept for logs and cache manifests.

    Attributes:
        embed_dim: token width D.
        patch_size: patch side in pixels.
        num_blocks: number of transformer blocks in the model.
        blocks: selected block indices, non-negative and ascending.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        blocks: Sequence[int] = (-1,),
        autocast_bf16: bool = True,
        model_name: str = "",
        weights: str = "",
    ) -> None:
        super().__init__()
        patch_h, patch_w = model.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"teacher patches must be square, got {patch_h}x{patch_w}")
        if model.cls_token is None:
            raise ValueError("teacher model has no CLS token")

        self.model = model
        self.embed_dim: int = model.embed_dim
        self.patch_size: int = patch_h
        self.num_blocks: int = len(model.blocks)
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.blocks: tuple[int, ...] = resolve_blocks(blocks, self.num_blocks)
        self.autocast_bf16 = autocast_bf16
        self.model_name = model_name
        self.weights = weights

        # Non-persistent, so a parent's state_dict gains no teacher tensors from the normalisation constants.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DinoV3Teacher:
        """Keep eval mode: ``mode`` is ignored so that ``parent.train()`` cannot put the teacher in train mode."""
        return super().train(False)

    def _autocast_enabled(self, device: torch.device) -> bool:
        return self.autocast_bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()

    # no_grad rather than inference_mode: the outputs are loss targets, and autograd must be able to save them
    # for the backward pass of the student's loss, which inference tensors forbid.
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """Compute teacher features.

        Args:
            images: ``[B, 3, H, W]`` float RGB in ``[0, 1]``, not normalised, any ``H`` and ``W``. Sizes that are
                not multiples of the patch size are resized by ``teacher_input_size``.

        Returns:
            ``TeacherOutput`` with float32 tensors.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"teacher expects float images in [0, 1], got dtype {images.dtype}; convert with images.float() / 255"
            )

        h, w = images.shape[-2:]
        input_h, input_w = teacher_input_size(int(h), int(w), self.patch_size)
        images = images.float()
        if (input_h, input_w) != (h, w):
            images = F.interpolate(
                images, size=(input_h, input_w), mode="bilinear", align_corners=False, antialias=True
            )
        images = (images - self.mean) / self.std

        with torch.autocast(
            device_type=images.device.type, dtype=torch.bfloat16, enabled=self._autocast_enabled(images.device)
        ):
            # Each entry is (patch tokens [B, P, D], prefix tokens [B, 1 + registers, D]) with the final norm applied.
            levels = self.model.forward_intermediates(
                images,
                indices=list(self.blocks),
                return_prefix_tokens=True,
                norm=True,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )

        patch_levels = tuple(patch.float() for patch, _ in levels)
        cls = levels[-1][1][:, 0].float()
        grid_size = (input_h // self.patch_size, input_w // self.patch_size)
        return TeacherOutput(cls=cls, patch=patch_levels[-1], patch_levels=patch_levels, grid_size=grid_size)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, weights={self.weights!r}, blocks={self.blocks}"
