"""Tiny randomly initialised DINOv3 models of the real timm architectures, shared by the teacher tests."""

from __future__ import annotations

import timm
import torch
from torch import nn

# Real DINOv3 block structure (RoPE, 4 registers, layer scale), shrunk to run in milliseconds on a CPU.
TINY_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_MODEL_NAMES = ("vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3")


def make_tiny_model(model_name: str, seed: int = 0, **extra_kwargs) -> nn.Module:
    """Build a tiny DINOv3 and give every tensor random values, so that each one changes the output.

    timm's default init leaves q/v biases at zero and layer scale at 1e-5, which would hide a mis-mapped bias or
    block from a 1e-5 comparison.
    """
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **{**TINY_KWARGS, **extra_kwargs})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.copy_(1.0 + 0.1 * noise)
            elif "gamma" in name:
                param.copy_(0.5 + 0.1 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Return ``[batch, 3, height, width]`` uniform values in [0, 1]."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
