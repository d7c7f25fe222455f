"""Fast first-order Plackett-Luce (ListMLE) NLL with an analytic backward pass.

For a row x already in target order, with K modelled positions and R_k = logsumexp_{m≥k} x_m::

    nll = Σ_{k<K} (R_k - x_k)
    ∂nll/∂x_m = Σ_{k≤min(m, K-1)} exp(x_m - R_k) - [m < K]

The suffix log-sum-exps R are computed as float64 sums of exp(x - row max), accumulated from the
end of the row. Every exponent then lies in [-600, 0], so no term underflows and each partial sum
keeps float64 relative accuracy, which is exact to far below float32 precision: this is log-space
arithmetic with a per-row reference. Rows whose score range exceeds 600 use ``torch.logcumsumexp``
instead. The backward pass recomputes R rather than storing it.

With ``torch.logcumsumexp`` and autograd, the same loss is several times slower on CPU, because
that kernel is sequential per element and its autograd formula runs further scans.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["listmle_nll"]

# Widest row score range (max - min) for the float64 path: exp(-(600 + log N)) stays a normal float64.
_MAX_RANGE = 600.0


def _suffix_logsumexp(x: Tensor) -> Tensor:
    """Return R[:, k] = logsumexp(x[:, k:]) for float64 x of rows with a score range ≤ _MAX_RANGE."""
    top = x.amax(1, keepdim=True)
    suffix = torch.exp(x - top).flip(1).cumsum(1).flip(1)
    return suffix.log_().add_(top)


def _split_wide(x: Tensor) -> Tensor | None:
    """Return the indices of rows whose score range is too wide for the float64 path, or None."""
    wide = (x.amax(1) - x.amin(1)) > _MAX_RANGE
    if not bool(wide.any()):
        return None
    return wide.nonzero()[:, 0]


def _suffix_lse_any(x: Tensor) -> Tensor:
    suffix = _suffix_logsumexp(x)
    wide = _split_wide(x)
    if wide is not None:
        suffix[wide] = torch.logcumsumexp(x[wide].flip(1), dim=1).flip(1)
    return suffix


class _ListMLE(torch.autograd.Function):
    # Autocast is off inside: the suffix sums must stay in float64.
    @staticmethod
    def forward(ctx, ranked: Tensor, num_positions: int) -> Tensor:  # type: ignore[override]
        x = ranked.detach().double()
        with torch.autocast(x.device.type, enabled=False):
            suffix = _suffix_lse_any(x)
        nll = (suffix[:, :num_positions] - x[:, :num_positions]).sum(1)
        ctx.save_for_backward(ranked)
        ctx.num_positions = num_positions
        return nll.to(ranked.dtype)

    @staticmethod
    def backward(ctx, grad_nll: Tensor):  # type: ignore[override]
        (ranked,) = ctx.saved_tensors
        with torch.autocast(ranked.device.type, enabled=False):
            return _ListMLE._backward(ctx, ranked, grad_nll)

    @staticmethod
    def _backward(ctx, ranked: Tensor, grad_nll: Tensor) -> tuple[Tensor, None]:
        k = ctx.num_positions
        x = ranked.double()
        suffix = _suffix_lse_any(x)[:, :k]
        # log Σ_{k'≤m} exp(-R_k'): -R rises along the row, so its last entry is the reference.
        ref = suffix[:, k - 1 : k]
        log_prefix = torch.exp(ref - suffix).cumsum(1).log_().sub_(ref)  # [Q, K]
        wide = _split_wide(x)
        if wide is not None:
            log_prefix[wide] = torch.logcumsumexp(-suffix[wide], dim=1)
        if k < x.shape[1]:
            tail = log_prefix[:, k - 1 : k].expand(-1, x.shape[1] - k)
            log_prefix = torch.cat([log_prefix, tail], dim=1)
        grad = torch.exp(x + log_prefix)  # each entry ≤ m + 1
        grad[:, :k] -= 1.0
        grad *= grad_nll.double()[:, None]
        return grad.to(ranked.dtype), None


def listmle_nll(ranked: Tensor, num_positions: int) -> Tensor:
    """Compute the first-order Plackett-Luce NLL of rows already in target order.

    Args:
        ranked: [Q, N] scores, column k holding the candidate at target position k (candidates past
            position K in any order).
        num_positions: number of modelled positions K, 1 ≤ K ≤ N.

    Returns:
        [Q] per-row NLL summed over the K positions, in the dtype of ``ranked``.
    """
    return _ListMLE.apply(ranked, num_positions)
