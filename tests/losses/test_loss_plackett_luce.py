"""First-order Plackett-Luce (ListMLE) against a float64 loop reference."""

import math

import pytest
import torch

from dinorankclip.losses import descending_order, plackett_luce_loss


def listmle_loop(scores: torch.Tensor, target: torch.Tensor, top_k=None) -> float:
    """Mean over rows of the ListMLE NLL, in plain float64 Python."""
    total = 0.0
    for row_scores, row_target in zip(scores.tolist(), target.tolist(), strict=True):
        # Descending target, ties by lower index first.
        ranking = sorted(range(len(row_target)), key=lambda i: (-row_target[i], i))
        k_max = len(ranking) if top_k is None else min(top_k, len(ranking))
        for k in range(k_max):
            rest = [row_scores[i] for i in ranking[k:]]
            top = max(rest)
            lse = top + math.log(sum(math.exp(r - top) for r in rest))
            total += lse - row_scores[ranking[k]]
    return total / scores.shape[0]


@pytest.mark.parametrize("top_k", [None, 1, 5, 16])
def test_plackett_luce_matches_loop(top_k):
    gen = torch.Generator().manual_seed(0)
    scores = 10 * torch.randn(6, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    got = plackett_luce_loss(scores, target, top_k)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(listmle_loop(scores, target, top_k), rel=1e-12)


def test_plackett_luce_float32_matches_float64_loop():
    gen = torch.Generator().manual_seed(1)
    scores = 50 * torch.randn(8, 64, generator=gen)
    target = torch.randn(8, 64, generator=gen)
    got = plackett_luce_loss(scores, target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(listmle_loop(scores.double(), target.double()), rel=1e-5)


def test_ties_broken_by_lower_index_first():
    target = torch.tensor([[1.0, 3.0, 1.0, 3.0, 2.0]])
    assert descending_order(target).tolist() == [[1, 3, 4, 0, 2]]
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5, 1.5]], dtype=torch.float64)
    assert plackett_luce_loss(scores, target).item() == pytest.approx(listmle_loop(scores, target), rel=1e-12)


def test_target_receives_no_gradient():
    scores = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5, requires_grad=True)
    plackett_luce_loss(scores, target).backward()
    assert target.grad is None
    assert scores.grad is not None


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
def test_invalid_top_k_rejected(top_k):
    with pytest.raises(ValueError, match="top_k"):
        plackett_luce_loss(torch.randn(2, 4), torch.randn(2, 4), top_k)


def test_one_dimensional_scores_rejected():
    with pytest.raises(ValueError, match=r"scores must be \[Q, N\].*scores\[None\]"):
        plackett_luce_loss(torch.randn(8), torch.randn(8))
