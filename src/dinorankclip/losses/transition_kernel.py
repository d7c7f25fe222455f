"""Memory-bounded order-R Plackett-Luce NLL: row chunks, recomputed in the backward pass.

The utilities U_j(d) = x_d + Σ_ℓ [j ≥ ℓ]·G_ℓ[π(j-ℓ), d] (see ``transition.py``) form a Q×K×N
tensor. This kernel never stores it: the forward pass builds it for a few rows at a time, keeps only
the per-position log-normalisers lse[q, j] (Q×K), and the backward pass rebuilds each chunk to form
the softmax p = exp(U - lse). The lag matrices G_ℓ = queries[ℓ] @ keys.T are recomputed in the
backward pass too; they only have rows for the U ≤ min(N, Q·(K-1)) items that precede a modelled
position, so the memory beyond the inputs is O(L·U·N + chunk) rather than O(Q·K·N).

Every logsumexp subtracts the maximum of its own terms before exponentiating. It works in base 2
(exp2 and log2), because torch 2.14's float32 exp2 took about a third of exp's time on the AMD EPYC
(AVX-512) development machine.

Gradients::

    ∂nll_q/∂U_j(d) = p_j(d) - [d = π_q(j)]
    ∂/∂x_d         = Σ_j (p_j(d) - [d = π(j)])
    ∂/∂G_ℓ[a, d]   = Σ_{(q, j): π_q(j-ℓ) = a} (p_j(d) - [d = π_q(j)])

and the gradients of the queries and keys follow from G_ℓ = queries[ℓ] @ keys.T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "transition_nll_chunked"]

LOG2E = 1.0 / math.log(2.0)
# Elements of one Q×K×N chunk (float32: 4 MiB), small enough to stay in the last-level cache.
CHUNK_ELEMENTS = 1 << 20


def _placed_items(order: Tensor, num_cand: int) -> tuple[Tensor, Tensor]:
    """Return the items that precede some modelled position, and a map from item to compact row.

    Only these items index rows of the lag matrices, so with few rows or positions (Q·(K-1) < N)
    the lag matrices shrink from N×N to U×N. Unused items map to the sentinel row U.
    """
    items = torch.unique(order[:, :-1])
    compact = torch.full((num_cand,), items.numel(), dtype=torch.long, device=order.device)
    compact[items] = torch.arange(items.numel(), device=order.device)
    return items, compact


def _lag_matrices(queries: Tensor, keys: Tensor, items: Tensor) -> Tensor:
    """Return [L, U + 1, N]: rows of G_ℓ = queries[ℓ] @ keys.T for ``items``, then a zero sentinel row."""
    num_lags, num_cand, _ = queries.shape
    num_items = items.numel()
    lag = queries.new_empty(num_lags, num_items + 1, num_cand)
    for ell in range(num_lags):
        torch.mm(queries[ell, items], keys.T, out=lag[ell, :num_items])
    lag[:, num_items] = 0.0
    return lag


def _lag_indices(order: Tensor, num_lags: int, compact: Tensor, sentinel: int) -> Tensor:
    """Return [Q, K, L]: for each position and lag ℓ, the lag matrix row of the item placed ℓ
    positions earlier (or the sentinel), offset by ℓ·(U + 1) to index the flattened lag matrices."""
    num_rows, num_pos = order.shape
    idx = order.new_full((num_rows, num_pos, num_lags), sentinel)
    for lag in range(1, num_lags + 1):
        if lag < num_pos:
            idx[:, lag:, lag - 1] = compact[order[:, : num_pos - lag]]
    return idx + torch.arange(num_lags, device=order.device) * (sentinel + 1)


class _Chunk:
    """Builder of the utilities of up to ``rows`` rows, with a buffer reused across chunks.

    Utilities are kept in base-2 units (U·log2 e) for exp2 (see the module docstring).
    """

    def __init__(self, rows: int, num_pos: int, num_cand: int, like: Tensor) -> None:
        self.util = like.new_empty(rows, num_pos, num_cand)
        # placed[j - 1, j'] = min(j', j - 1): the positions already filled before position j ≥ 1,
        # padded by repeating position j - 1.
        steps = torch.arange(max(num_pos - 1, 0), device=like.device)
        self.placed = torch.minimum(steps[None, :], steps[:, None])

    def build(self, x2: Tensor, order: Tensor, lag_idx: Tensor, lag2: Tensor) -> Tensor:
        """Return the masked base-2 utilities [c, K, N] for the rows ``x2`` ([c, N], c ≤ buffer rows).

        ``lag_idx`` is [c, K, L]: for each position, the row of each lag's matrix in ``lag2``
        flattened to [L·(U+1), N].
        """
        rows, num_pos = order.shape
        num_cand = x2.shape[1]
        if lag_idx.shape[2] == 1:
            util = self.util[:rows]
            torch.index_select(lag2, 0, lag_idx.reshape(-1), out=util.view(rows * num_pos, num_cand))
        else:
            # One fused gather-and-sum over the lags' rows, instead of a gather and an add per lag.
            util = F.embedding_bag(lag_idx.reshape(rows * num_pos, -1), lag2, mode="sum")
            util = util.view(rows, num_pos, num_cand)
        util.add_(x2[:, None, :])
        if num_pos > 1:
            # Position j excludes the j candidates placed before it: K² writes per row, not K·N.
            util[:, 1:].scatter_(2, order[:, self.placed], float("-inf"))
        return util


def _rows_base2(scores: Tensor, lo: int, hi: int) -> Tensor:
    """Return rows lo:hi of ``scores`` times log2 e, contiguous even when ``scores`` is a transposed view."""
    return torch.mul(scores[lo:hi], LOG2E, out=scores.new_empty(hi - lo, scores.shape[1]))


def _chunk_rows(num_pos: int, num_cand: int, num_rows: int) -> int:
    return max(1, min(num_rows, CHUNK_ELEMENTS // max(1, num_pos * num_cand)))


def _lags_base2(order: Tensor, queries: Tensor, keys: Tensor, num_cand: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the placed items, their lag matrices times log2 e ([L, U + 1, N]) and the lag row indices."""
    items, compact = _placed_items(order, num_cand)
    lag2 = _lag_matrices(queries * LOG2E, keys, items)
    return items, lag2, _lag_indices(order, queries.shape[0], compact, items.numel())


def _forward(scores: Tensor, order: Tensor, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    num_rows, num_cand = scores.shape
    num_pos = order.shape[1]
    _, lag2, lag_idx = _lags_base2(order, queries, keys, num_cand)
    lag2_flat = lag2.view(-1, num_cand)
    step = _chunk_rows(num_pos, num_cand, num_rows)
    chunk = _Chunk(step, num_pos, num_cand, scores)
    lse2 = scores.new_empty(num_rows, num_pos)
    nll = scores.new_empty(num_rows)
    for lo in range(0, num_rows, step):
        hi = min(lo + step, num_rows)
        util = chunk.build(_rows_base2(scores, lo, hi), order[lo:hi], lag_idx[lo:hi], lag2_flat)
        chosen = util.gather(2, order[lo:hi, :, None])[..., 0]  # [c, K]
        top = util.amax(2, keepdim=True)
        log_norm = util.sub_(top).exp2_().sum(2).log2_().add_(top[..., 0])
        lse2[lo:hi] = log_norm
        nll[lo:hi] = (log_norm - chosen).sum(1).mul_(math.log(2.0))
    return nll, lse2


def _backward(
    scores: Tensor, order: Tensor, queries: Tensor, keys: Tensor, lse2: Tensor, grad_nll: Tensor
) -> tuple[Tensor, None, Tensor, Tensor]:
    num_rows, num_cand = scores.shape
    num_pos = order.shape[1]
    items, lag2, lag_idx = _lags_base2(order, queries, keys, num_cand)
    lag2_flat = lag2.view(-1, num_cand)

    grad_lag = torch.zeros_like(lag2)
    grad_lag_flat = grad_lag.view(-1, num_cand)
    # Contiguous even for a transposed ``scores`` view, so the per-chunk row sums write rows.
    grad_scores = scores.new_empty(scores.shape)
    grad_nll = grad_nll.to(scores.dtype)
    step = _chunk_rows(num_pos, num_cand, num_rows)
    chunk = _Chunk(step, num_pos, num_cand, scores)

    for lo in range(0, num_rows, step):
        hi = min(lo + step, num_rows)
        rows = hi - lo
        util = chunk.build(_rows_base2(scores, lo, hi), order[lo:hi], lag_idx[lo:hi], lag2_flat)
        weight = grad_nll[lo:hi, None, None]
        # Softmax times the incoming gradient, minus it at each chosen candidate.
        grad_util = util.sub_(lse2[lo:hi, :, None]).exp2_().mul_(weight)
        grad_util.scatter_add_(2, order[lo:hi, :, None], -weight.expand(rows, num_pos, 1))
        torch.sum(grad_util, dim=1, out=grad_scores[lo:hi])
        flat = grad_util.view(rows * num_pos, num_cand)
        for ell in range(lag2.shape[0]):
            grad_lag_flat.index_add_(0, lag_idx[lo:hi, :, ell].reshape(-1), flat)

    grad_lag = grad_lag[:, : items.numel()]  # the sentinel row has no parameters
    grad_queries = torch.zeros_like(queries)
    grad_queries[:, items] = torch.matmul(grad_lag, keys)  # [L, U, W]
    grad_keys = torch.einsum("lad,law->dw", grad_lag, queries[:, items])
    return grad_scores, None, grad_queries, grad_keys


class _TransitionNLL(torch.autograd.Function):
    # Autocast is off inside: the kernel writes float32/float64 buffers and controls its own precision.
    @staticmethod
    def forward(ctx, scores: Tensor, order: Tensor, queries: Tensor, keys: Tensor) -> Tensor:  # type: ignore[override]
        with torch.autocast(scores.device.type, enabled=False):
            nll, lse2 = _forward(scores, order, queries, keys)
        ctx.save_for_backward(scores, order, queries, keys, lse2)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor):  # type: ignore[override]
        with torch.autocast(grad_nll.device.type, enabled=False):
            return _backward(*ctx.saved_tensors, grad_nll)


def transition_nll_chunked(scores: Tensor, order: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    """Compute the order-R Plackett-Luce NLL of each row without materialising Q×K×N tensors.

    Args:
        scores: [Q, N] first-order candidate scores x, any strides (a transposed view is read chunk by
            chunk, not copied).
        order: [Q, K] target ranking (candidate indices, best first).
        queries: [L, N, W] per-lag queries (``TransitionHeads.lag_factors``).
        keys: [N, W] keys.

    Returns:
        [Q] per-row NLL summed over the K positions, float32 (float64 for float64 scores).
    """
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return _TransitionNLL.apply(
        scores.to(dtype), order.contiguous(), queries.to(dtype).contiguous(), keys.to(dtype).contiguous()
    )
