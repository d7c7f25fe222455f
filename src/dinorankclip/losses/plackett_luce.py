"""First-order Plackett-Luce (ListMLE) negative log-likelihood of target rankings.

A list is one row of scores over N candidates. Its target ranking π is the descending order of the
matching row of target scores, used only as an order (no gradient flows into the target), with ties
broken by the lower candidate index first. With K modelled positions (``top_k``; K = N by default)::

    -log P(π | x) = Σ_{k<K} [ logsumexp_{m≥k} x[π(m)] - x[π(k)] ]

Items beyond position K are not modelled, but they stay in every denominator.

Normalisation: ``plackett_luce_loss`` returns the mean over rows of this per-row sum over K positions,
so its value grows like K·log N by design (it is the log-likelihood of a whole permutation).
``RankingLoss`` divides the per-row sum by K before averaging.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["descending_order", "plackett_luce_loss", "plackett_luce_nll"]


def _check_top_k(top_k: int | None, num_candidates: int) -> int:
    """Return the number of modelled positions K for a ``top_k`` setting."""
    if top_k is None:
        return num_candidates
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    return min(top_k, num_candidates)


def descending_order(target_scores: Tensor, top_k: int | None = None) -> Tensor:
    """Return the target ranking of each row: candidate indices by descending score, ties by index.

    Args:
        target_scores: [Q, N] scores that define the order (no gradient is taken).
        top_k: keep only the first K positions of each ranking (None keeps all N).

    Returns:
        [Q, K] int64 candidate indices, best first.
    """
    if target_scores.ndim != 2:
        raise ValueError(f"target_scores must be [Q, N], got shape {tuple(target_scores.shape)}")
    k = _check_top_k(top_k, target_scores.shape[1])
    order = torch.sort(target_scores.detach(), dim=1, descending=True, stable=True).indices
    return order[:, :k]


def _loss_dtype(scores: Tensor) -> torch.dtype:
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def plackett_luce_nll(scores: Tensor, order: Tensor) -> Tensor:
    """Compute the first-order Plackett-Luce negative log-likelihood of each row's ranking.

    Args:
        scores: [Q, N] candidate scores (the model's utilities).
        order: [Q, K] target ranking from ``descending_order``; K ≤ N positions are modelled.

    Returns:
        [Q] per-row negative log-likelihood summed over the K positions, float32 (float64 for float64
        scores).
    """
    if scores.ndim != 2 or order.ndim != 2 or order.shape[0] != scores.shape[0]:
        raise ValueError(f"scores must be [Q, N] and order [Q, K], got {tuple(scores.shape)} and {tuple(order.shape)}")
    num_positions = order.shape[1]
    x = scores.to(_loss_dtype(scores))
    if num_positions < x.shape[1]:
        # Candidates outside the top K go after the ranked ones, in any order: they only enter denominators.
        rest = torch.ones_like(x, dtype=torch.bool).scatter_(1, order, False)
        rest_idx = rest.nonzero()[:, 1].view(x.shape[0], -1)
        order = torch.cat([order, rest_idx], dim=1)
    ranked = x.gather(1, order)  # [Q, N], target order
    suffix_lse = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    return (suffix_lse - ranked)[:, :num_positions].sum(1)


def plackett_luce_loss(scores: Tensor, target_scores: Tensor, top_k: int | None = None) -> Tensor:
    """Compute the mean over rows of the first-order Plackett-Luce NLL (ListMLE).

    Reference loop::

        for each row i:
            pi = stable descending argsort of target_scores[i]
            nll_i = sum(logsumexp(scores[i, pi[k:]]) - scores[i, pi[k]] for k in range(K))
        loss = mean_i nll_i

    Args:
        scores: [Q, N] candidate scores.
        target_scores: [Q, N] scores whose descending order is the target ranking (no gradient).
        top_k: number of modelled positions K (None: all N).

    Returns:
        Scalar loss.
    """
    if scores.shape != target_scores.shape:
        raise ValueError(
            f"scores and target_scores must have the same shape, got {tuple(scores.shape)} and "
            f"{tuple(target_scores.shape)}"
        )
    return plackett_luce_nll(scores, descending_order(target_scores, top_k)).mean()
