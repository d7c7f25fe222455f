"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["build_optimizer", "lr_factor", "no_weight_decay"]

_NO_DECAY_KEYS = ("bias", "logit_scale", "norm", "ln_", ".ln", "bn", "pos_embed", "positional_embedding",
                  "class_embedding", "cls_token", "query", "reg_token")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter is exempt from weight decay: gains, biases, norms, the logit scale, embeddings
    of positions and learned tokens (all one-dimensional or named as such)."""
    return param.ndim < 2 or any(key in name for key in _NO_DECAY_KEYS)


def build_optimizer(
    modules: Iterable[tuple[str, nn.Module]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``modules`` with two groups: decayed and not decayed.

    Args:
        modules: (prefix, module) pairs, e.g. the model and the objective (which owns ranking heads).
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for prefix, module in modules:
        for name, param in module.named_parameters(prefix=prefix):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop: about 8x for the
    # tiny preset's 15M parameters on a 2-core CPU.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
