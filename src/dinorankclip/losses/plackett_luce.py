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

from .listmle import listmle_nll
from .ordering import check_top_k, descending_order

__all__ = ["descending_order", "plackett_luce_loss", "plackett_luce_nll"]


def _loss_dtype(scores: Tensor) -> torch.dtype:
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def reversed_complete_order(order: Tensor, num_candidates: int) -> Tensor:
    """Return [Q, N]: each row's unranked candidates (in index order), then its K ranked ones, last first."""
    ranked = order.flip(1)
    if order.shape[1] == num_candidates:
        return ranked
    rest = torch.ones(order.shape[0], num_candidates, dtype=torch.bool, device=order.device)
    rest.scatter_(1, order, False)
    rest_idx = rest.nonzero()[:, 1].view(order.shape[0], -1)
    return torch.cat([rest_idx, ranked], dim=1)


def plackett_luce_nll(
    scores: Tensor, order: Tensor, num_positions: int | None = None, *, reverse: bool = False
) -> Tensor:
    """Compute the first-order Plackett-Luce negative log-likelihood of each row's ranking.

    Args:
        scores: [Q, N] candidate scores (the model's utilities).
        order: [Q, K] target ranking from ``descending_order``, best first; or, with ``reverse``,
            [Q, N] from ``descending_order(..., reverse=True)``, last position first.
        num_positions: number of modelled positions (default: K, or N with ``reverse``).
        reverse: ``order`` is complete and given last position first.

    Returns:
        [Q] per-row NLL summed over the modelled positions, float32 (float64 for float64 scores).
    """
    if scores.ndim != 2 or order.ndim != 2 or order.shape[0] != scores.shape[0] or order.shape[1] > scores.shape[1]:
        raise ValueError(
            f"scores must be [Q, N] and order [Q, K] with K <= N, got {tuple(scores.shape)} and {tuple(order.shape)}"
        )
    if reverse and order.shape[1] != scores.shape[1]:
        raise ValueError(f"a reversed order must be complete [Q, N], got {tuple(order.shape)}")
    limit = order.shape[1]
    num_positions = limit if num_positions is None else num_positions
    if not 1 <= num_positions <= limit:
        raise ValueError(f"num_positions must be in 1..{limit}, got {num_positions}")
    full = order if reverse else reversed_complete_order(order, scores.shape[1])
    return listmle_nll(scores.to(_loss_dtype(scores)), full, num_positions)


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
    if scores.ndim != 2:
        raise ValueError(f"scores must be [Q, N] (one row per list), got shape {tuple(scores.shape)}; "
                         "use scores[None] for a single list")
    if scores.shape != target_scores.shape:
        raise ValueError(
            f"scores and target_scores must have the same shape, got {tuple(scores.shape)} and "
            f"{tuple(target_scores.shape)}"
        )
    num_positions = check_top_k(top_k, scores.shape[1])
    order = descending_order(target_scores, top_k, reverse=True)
    return plackett_luce_nll(scores, order, num_positions, reverse=True).mean()
