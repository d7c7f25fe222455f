"""Target orderings: the numpy packed-key path against torch's stable sort, ties and reversal."""

import pytest
import torch

from dinorankclip.losses import descending_order


def reference_order(target: torch.Tensor) -> torch.Tensor:
    return torch.sort(target.double(), dim=1, descending=True, stable=True).indices


@pytest.mark.parametrize("shape", [(5, 1), (7, 33), (300, 8192)])
def test_cpu_order_matches_stable_sort_with_ties(shape):
    gen = torch.Generator().manual_seed(shape[1])
    # Few distinct values, so most entries tie; include both zeros and negative values.
    target = torch.randint(-3, 4, shape, generator=gen).float() * 0.5
    target[:, ::5] = -0.0
    want = reference_order(target)
    torch.testing.assert_close(descending_order(target), want, rtol=0, atol=0)
    torch.testing.assert_close(descending_order(target, reverse=True), want.flip(1), rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [1, 3, 32])
def test_cpu_top_k_matches_stable_sort_prefix(top_k):
    gen = torch.Generator().manual_seed(top_k)
    target = torch.randint(0, 5, (40, 64), generator=gen).float()
    want = reference_order(target)
    assert torch.equal(descending_order(target, top_k), want[:, :top_k])
    complete = descending_order(target, top_k, complete=True)
    assert torch.equal(complete[:, :top_k], want[:, :top_k])
    assert torch.equal(complete.sort(1).values, torch.arange(64).expand(40, 64))
    reverse = descending_order(target, top_k, reverse=True)
    assert torch.equal(reverse[:, -top_k:], want[:, :top_k].flip(1))
    assert torch.equal(reverse.sort(1).values, torch.arange(64).expand(40, 64))


def test_bfloat16_targets_use_their_exact_values():
    target = torch.tensor([[0.1, 0.3, 0.1, -2.0]]).bfloat16()
    assert descending_order(target).tolist() == [[1, 0, 2, 3]]


def test_order_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"\[Q, N\]"):
        descending_order(torch.randn(4))
