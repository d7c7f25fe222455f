"""Shared helpers for the loss tests: seeded, L2-normalised random features."""

import pytest
import torch
import torch.nn.functional as F


def unit_features(
    num: int, dim: int, *, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return image and text features [num, dim] on the unit sphere, correlated like a trained model's."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(num, dim, generator=gen, dtype=torch.float64)
    img = F.normalize(shared + 0.8 * torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(shared + 0.8 * torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


@pytest.fixture
def features():
    return unit_features
