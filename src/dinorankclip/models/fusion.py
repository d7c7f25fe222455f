"""Gated multi-scale fusion that injects dense teacher-space tokens into the CLIP embedding.

Pipeline for one image (S token grids of shape [P, Dt] on an h x w grid):

1. Pyramid pooling: each grid is pooled to the levels in ``pyramid_levels`` (default 1x1, 2x2, 4x4) and
   projected to the fusion width W, giving M = S * sum(l * l) multi-scale tokens [M, W].
2. Channel attention (squeeze-excite over W from average- and max-pooled tokens), then spatial attention
   that weights each of the M tokens.
3. Refiner: transformer blocks over [query; tokens]; the learned query's output is the pooled feature r~,
   projected to the CLIP width E by a zero-initialised linear layer, so the model starts as the plain trunk.
4. Conflict-aware gate (:class:`ConflictGate`): ``g = sigmoid(MLP([z, r])) * (1 - relu(-cos(r, z)))`` and
   ``z_fused = normalize(z + P_perp(g * r))`` with ``P_perp x = x - (x . z) z`` for the unit trunk embedding z.
   Because the residual is orthogonal to z, ``cos(z_fused, z) = 1 / sqrt(1 + |delta|^2)``, i.e. the trunk's
   direction changes only at second order in the residual.

Variants (ablation): ``no_pyramid`` pools each grid to one token, ``no_channel_spatial`` skips step 2,
``no_refiner`` replaces step 3's transformer by a mean over tokens, ``no_gate`` adds r to z without gate or
projection, ``image_only`` drops the text-side residual (the model handles that one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from ..config import FusionConfig

__all__ = ["ConflictGate", "MultiScaleFusion", "orthogonal_inject"]


def orthogonal_inject(z_unit: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Add the part of ``residual`` orthogonal to ``z_unit`` and re-normalise.

    Args:
        z_unit: [B, E] unit-norm trunk embedding.
        residual: [B, E] gated residual.

    Returns:
        [B, E] unit-norm fused embedding.
    """
    along = (residual * z_unit).sum(dim=-1, keepdim=True)
    delta = residual - along * z_unit
    return F.normalize(z_unit + delta, dim=-1)


class ConflictGate(nn.Module):
    """Conflict-aware gate shared by the image and text residuals.

    Args:
        embed_dim: CLIP width E.
        hidden: hidden width of the gate MLP.
        enabled: False gives the ``no_gate`` variant (plain residual add, g = 1).
    """

    def __init__(self, embed_dim: int, hidden: int, *, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.mlp = Mlp(2 * embed_dim, hidden, embed_dim) if enabled else None

    def forward(self, z_unit: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse ``residual`` [B, E] into the unit trunk embedding ``z_unit`` [B, E].

        Returns:
            The unit fused embedding [B, E] and the gate values g [B, E] (ones for ``no_gate``).
        """
        if not self.enabled:
            return F.normalize(z_unit + residual, dim=-1), torch.ones_like(residual)
        cos = F.cosine_similarity(residual, z_unit, dim=-1, eps=1e-8).unsqueeze(-1)
        conflict = torch.relu(-cos)
        gate = torch.sigmoid(self.mlp(torch.cat([z_unit, residual], dim=-1))) * (1.0 - conflict)
        return orthogonal_inject(z_unit, gate * residual), gate


class ChannelSpatialAttention(nn.Module):
    """CBAM-style attention on a token set [B, M, W]: channels first, then tokens."""

    def __init__(self, width: int, reduction: int = 4) -> None:
        super().__init__()
        self.channel_mlp = nn.Sequential(
            nn.Linear(width, width // reduction), nn.GELU(), nn.Linear(width // reduction, width)
        )
        self.spatial = nn.Linear(2, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.channel_mlp(tokens.mean(dim=1)) + self.channel_mlp(tokens.amax(dim=1)))
        tokens = tokens * channel.unsqueeze(1)  # [B, M, W] * [B, 1, W]
        stats = torch.stack([tokens.mean(dim=-1), tokens.amax(dim=-1)], dim=-1)  # [B, M, 2]
        return tokens * torch.sigmoid(self.spatial(stats))  # [B, M, W] * [B, M, 1]


class MultiScaleFusion(nn.Module):
    """Turn S teacher-space token grids into a residual r [B, E] for the CLIP embedding.

    Args:
        cfg: fusion section of the config.
        in_dim: width Dt of the incoming tokens.
        num_levels: S, the number of token grids (depths).
        grid: (h, w) of every token grid.
        embed_dim: CLIP width E.
    """

    def __init__(self, cfg: FusionConfig, *, in_dim: int, num_levels: int, grid: tuple[int, int], embed_dim: int):
        super().__init__()
        self.variant = cfg.variant
        self.grid = tuple(grid)
        self.pyramid = [1] if cfg.variant == "no_pyramid" else sorted(set(cfg.pyramid_levels))
        num_tokens = num_levels * sum(level * level for level in self.pyramid)
        width = cfg.width
        self.in_proj = nn.ModuleList([nn.Linear(in_dim, width) for _ in range(num_levels)])
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.attention = None if cfg.variant == "no_channel_spatial" else ChannelSpatialAttention(width)
        if cfg.variant == "no_refiner":
            self.query = None
            self.refiner = None
        else:
            self.query = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(self.query, std=0.02)
            self.refiner = nn.Sequential(*[Block(width, cfg.refiner_heads) for _ in range(cfg.refiner_depth)])
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.gate = ConflictGate(embed_dim, cfg.gate_hidden, enabled=cfg.variant != "no_gate")

    def tokens(self, levels: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Pool S grids [B, P, Dt] into M multi-scale tokens [B, M, W]."""
        h, w = self.grid
        pooled = []
        for proj, level in zip(self.in_proj, levels, strict=True):
            if level.shape[1] != h * w:
                raise ValueError(f"fusion expected {h}x{w}={h * w} tokens per grid, got {level.shape[1]}")
            fmap = level.transpose(1, 2).reshape(level.shape[0], -1, h, w)  # [B, Dt, h, w]
            # Average pooling commutes with the affine projection, so pooling first projects M tokens, not P.
            level_tokens = [F.adaptive_avg_pool2d(fmap, size).flatten(2) for size in self.pyramid]  # [B, Dt, size^2]
            pooled.append(proj(torch.cat(level_tokens, dim=2).transpose(1, 2)))  # [B, sum size^2, W]
        return torch.cat(pooled, dim=1) + self.pos_embed

    def residual(self, levels: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Compute the residual r [B, E] (zero at initialisation) from S token grids."""
        tokens = self.tokens(levels)
        if self.attention is not None:
            tokens = self.attention(tokens)
        if self.refiner is None:
            pooled = tokens.mean(dim=1)
        else:
            query = self.query.expand(tokens.shape[0], -1, -1)
            pooled = self.refiner(torch.cat([query, tokens], dim=1))[:, 0]
        return self.out_proj(self.norm(pooled))

    def forward(
        self, z_unit: torch.Tensor, levels: tuple[torch.Tensor, ...] | list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fuse the token grids into the unit trunk embedding ``z_unit`` [B, E].

        Returns:
            fused unit embedding [B, E], gate values [B, E], residual r [B, E].
        """
        r = self.residual(levels)
        fused, gate = self.gate(z_unit, r)
        return fused, gate, r
