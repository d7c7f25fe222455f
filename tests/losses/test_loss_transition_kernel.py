"""Chunked order-R kernel against the dense reference: values, gradients, chunk boundaries."""

import pytest
import torch

from dinorankclip.losses import TransitionHeads, descending_order, transition_kernel, transition_nll
from dinorankclip.losses.transition_kernel import transition_nll_chunked


def random_case(order, num_rows, num_cand, top_k, *, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = TransitionHeads(order, 8, heads=2, head_dim=4).to(dtype)
    with torch.no_grad():
        for scale in heads.scale:
            scale.uniform_(-1.0, 1.0, generator=gen)
    cand = torch.randn(num_cand, 8, generator=gen, dtype=dtype)
    scores = (4 * torch.randn(num_rows, num_cand, generator=gen, dtype=dtype)).requires_grad_(True)
    ranking = descending_order(torch.randn(num_rows, num_cand, generator=gen, dtype=dtype), top_k)
    return heads, cand, scores, ranking


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("top_k", [None, 1, 5])
def test_chunked_matches_dense_values_and_gradients(order, top_k, monkeypatch):
    # A tiny chunk forces several chunks, including a short last one.
    monkeypatch.setattr(transition_kernel, "CHUNK_ELEMENTS", 3 * 11 * 5)
    heads, cand, scores, ranking = random_case(order, 7, 11, top_k, seed=order)
    params = [scores, *heads.parameters()]

    queries, keys = heads.lag_factors(cand)
    dense = transition_nll(scores, ranking, queries, keys)
    weights = torch.linspace(0.5, 2.0, dense.shape[0], dtype=dense.dtype)
    dense_grads = torch.autograd.grad((dense * weights).sum(), params, allow_unused=True, materialize_grads=True)

    queries, keys = heads.lag_factors(cand)
    chunked = transition_nll_chunked(scores, ranking, queries, keys)
    chunked_grads = torch.autograd.grad((chunked * weights).sum(), params, allow_unused=True, materialize_grads=True)

    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    for got, want in zip(chunked_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunked_gradcheck():
    heads, cand, scores, ranking = random_case(3, 3, 6, 4, seed=0)
    queries, keys = heads.lag_factors(cand)
    queries = queries.detach().requires_grad_(True)
    keys = keys.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s, q, k: transition_nll_chunked(s, ranking, q, k), (scores, queries, keys), eps=1e-6, atol=1e-7
    )
