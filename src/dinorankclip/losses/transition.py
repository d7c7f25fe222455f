"""Attention-parameterised transition terms of the order-R Plackett-Luce model (R = 2..4).

The utility of candidate d at position j of a list depends on the R-1 items placed just before it::

    U_j(d) = x_d + Σ_{r=2..R} α_r · τ_r(π(j-r+1), …, π(j-1); d)
    τ_r(a_1, …, a_{r-1}; d) = ⟨W_q^r [h_a1; …; h_a(r-1)], W_k^r h_d⟩ / √d_h      (per head, then mixed)

r = 2 is the pairwise term, r = 3 the tuple-wise term, r = 4 uses three placed items. h are the
candidates' embeddings, W_q^r and W_k^r are multi-head projections (H heads of width d_h) and
α_r ∈ R^H are per-head scales initialised to 0, so order R starts exactly at order R-1. A missing
predecessor (position j < lag) contributes nothing, as if its embedding were zero.

Because the query of τ_r is linear in the concatenation, τ_r splits into one term per lag ℓ = 1..r-1.
Summing over orders gives one matrix per lag, G_ℓ[a, d] = ⟨q_ℓ(a), k(d)⟩, and::

    U_j(d) = x_d + Σ_{ℓ=1..R-1} [j ≥ ℓ] · G_ℓ[π(j-ℓ), d]

where q_ℓ stacks the α-scaled queries of every order for lag ℓ and k stacks every order's keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MAX_ORDER", "TransitionHeads", "transition_nll"]

MAX_ORDER = 4


class TransitionHeads(nn.Module):
    """Projections and scales of the transition terms for orders 2..``order``.

    Args:
        order: highest Plackett-Luce order R (2..4); R-1 lags are modelled.
        embed_dim: width E of the candidate embeddings.
        heads: number of heads H per order.
        head_dim: width d_h of each head.
    """

    def __init__(self, order: int, embed_dim: int, *, heads: int, head_dim: int) -> None:
        super().__init__()
        if not 2 <= order <= MAX_ORDER:
            raise ValueError(f"TransitionHeads order must be in 2..{MAX_ORDER}, got {order}")
        if heads < 1 or head_dim < 1:
            raise ValueError(f"heads and head_dim must be positive, got heads={heads}, head_dim={head_dim}")
        self.order = order
        self.heads = heads
        self.head_dim = head_dim
        width = heads * head_dim
        # Order r reads r-1 placed items, so its query projection maps (r-1)·E to H·d_h.
        self.query = nn.ModuleList(nn.Linear((r - 1) * embed_dim, width, bias=False) for r in range(2, order + 1))
        self.key = nn.ModuleList(nn.Linear(embed_dim, width, bias=False) for _ in range(2, order + 1))
        self.scale = nn.ParameterList(nn.Parameter(torch.zeros(heads)) for _ in range(2, order + 1))

    @property
    def num_lags(self) -> int:
        return self.order - 1

    def lag_factors(self, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """Return per-lag queries and shared keys such that G_ℓ = queries[ℓ-1] @ keys.T.

        Args:
            candidates: [N, E] embeddings of the list's candidates.

        Returns:
            queries [R-1, N, W] and keys [N, W], W = (R-1)·H·d_h, with the scales α_r and 1/√d_h
            folded into the queries.
        """
        num, embed_dim = candidates.shape
        width = self.heads * self.head_dim
        queries = candidates.new_zeros(self.num_lags, num, self.num_lags * width)
        keys = []
        for i, (query, key, scale) in enumerate(zip(self.query, self.key, self.scale, strict=True)):
            order = i + 2
            head_scale = (scale / math.sqrt(self.head_dim)).repeat_interleave(self.head_dim)  # [H·d_h]
            cols = slice(i * width, (i + 1) * width)
            # The query input is [h_(j-r+1); …; h_(j-1)]: block b of the weight reads lag r-1-b.
            weight = query.weight.view(width, order - 1, embed_dim)
            for block in range(order - 1):
                lag = order - 1 - block
                queries[lag - 1, :, cols] = (candidates @ weight[:, block].T) * head_scale
            keys.append(key(candidates))
        return queries, torch.cat(keys, dim=1)


def transition_nll(scores: Tensor, order: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    """Compute the order-R Plackett-Luce NLL of each row's ranking with transition terms.

    Builds the [Q, K, N] utilities at once; use it for small lists and as the reference for the
    chunked implementation.

    Args:
        scores: [Q, N] first-order candidate scores x.
        order: [Q, K] target ranking (candidate indices, best first).
        queries: [L, N, W] per-lag queries from ``TransitionHeads.lag_factors``.
        keys: [N, W] keys.

    Returns:
        [Q] per-row NLL summed over the K positions.
    """
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.to(dtype)
    num_rows, num_cand = x.shape
    num_pos = order.shape[1]
    lag_mats = (queries.to(dtype) @ keys.to(dtype).T).unbind(0)  # L × [N, N]
    util = x[:, None, :].expand(num_rows, num_pos, num_cand).clone()  # [Q, K, N]
    for lag, g in enumerate(lag_mats, start=1):
        if lag < num_pos:
            util[:, lag:] += g[order[:, : num_pos - lag]]
    # Position j excludes the j items already placed.
    rank = torch.full_like(x, num_cand, dtype=torch.long).scatter_(
        1, order, torch.arange(num_pos, device=x.device).expand_as(order)
    )
    placed = rank[:, None, :] < torch.arange(num_pos, device=x.device)[None, :, None]
    util = util.masked_fill(placed, float("-inf"))
    chosen = util.gather(2, order[:, :, None])[..., 0]  # [Q, K]
    return (torch.logsumexp(util, dim=2) - chosen).sum(1)
