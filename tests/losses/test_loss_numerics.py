"""Numerics: finite losses and gradients over list lengths, logit scales and precisions; agreement
with float64; gradcheck; permutation equivariance; extreme score ranges."""

import math

import pytest
import torch
from conftest import unit_features
from test_loss_plackett_luce import listmle_loop

from dinorankclip.losses import RankingLoss, clip_loss, descending_order, plackett_luce_loss, plackett_luce_nll
from dinorankclip.losses.transition_kernel import transition_nll_chunked


def ranking(order, dim, top_k, *, seed=0):
    torch.manual_seed(seed)
    loss = RankingLoss(order, dim, top_k, heads=2, head_dim=8)
    if loss.transition is not None:
        with torch.no_grad():
            for scale in loss.transition.scale:
                scale.fill_(0.5)  # non-zero transitions, as after some training
    return loss


def loss_and_grads(loss_module, img, txt, scale, autocast_dtype=None):
    img = img.detach().clone().requires_grad_(True)
    txt = txt.detach().clone().requires_grad_(True)
    scale = torch.tensor(scale, dtype=img.dtype)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        value = clip_loss(img, txt, scale) + loss_module(img, txt, scale)
    params = [img, txt, *loss_module.parameters()]
    grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
    return value.detach(), grads


def list_losses(num, scale, *, dtype=torch.float32, autocast=False, rows=16):
    """Return the order-1 and order-3 list NLLs of ``rows`` image rows over ``num`` text candidates,
    and their gradients with respect to the image and text features."""
    img, txt = unit_features(num, 32, seed=num, dtype=dtype)
    img = img[:rows].clone().requires_grad_(True)
    txt = txt.requires_grad_(True)
    heads = ranking(3, 32, None).transition.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        scores = scale * img @ txt.T
        target = scale * txt[:rows] @ torch.cat([img.detach(), txt.detach()[rows:]]).T
        first = plackett_luce_nll(scores, descending_order(target, reverse=True), num, reverse=True).mean()
        queries, keys = heads.lag_factors(txt)
        third = transition_nll_chunked(scores, descending_order(target, 16), queries, keys).mean()
    return [(value.detach(), torch.autograd.grad(value, (img, txt), retain_graph=True)) for value in (first, third)]


@pytest.mark.parametrize("num", [8, 64, 512, 4096])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_list_grid_float32_matches_float64(num, scale):
    for (value, grads), (ref, ref_grads) in zip(
        list_losses(num, scale), list_losses(num, scale, dtype=torch.float64), strict=True
    ):
        assert torch.isfinite(value)
        assert value.item() == pytest.approx(ref.item(), rel=1e-5)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(grad).all()
            assert (grad.double() - ref_grad).norm() <= 1e-4 * ref_grad.norm()


@pytest.mark.parametrize("num", [8, 64, 512, 4096])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_list_grid_bf16_autocast_finite(num, scale):
    results = list_losses(num, scale, autocast=True)
    references = list_losses(num, scale, dtype=torch.float64)
    for (value, grads), (ref, _) in zip(results, references, strict=True):
        assert torch.isfinite(value)
        for grad in grads:
            assert torch.isfinite(grad).all()
        # bf16 keeps 8 mantissa bits, so scores move by about 0.4 % and near-tied targets reorder.
        assert value.item() == pytest.approx(ref.item(), rel=0.05)


@pytest.mark.parametrize("num", [8, 64, 256])
@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("order,top_k", [(1, None), (3, 8)])
def test_ranking_loss_float32_matches_float64(num, scale, order, top_k):
    img, txt = unit_features(num, 32, seed=num)
    module = ranking(order, 32, top_k)
    value, grads = loss_and_grads(module, img, txt, scale)
    ref_value, ref_grads = loss_and_grads(module.double(), img.double(), txt.double(), scale)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all()
        assert (grad.double() - ref).norm() <= 1e-4 * ref.norm() + 1e-9


@pytest.mark.parametrize("num", [8, 256])
@pytest.mark.parametrize("order,top_k", [(1, None), (3, 8)])
def test_ranking_loss_bf16_autocast_finite(num, order, top_k):
    img, txt = unit_features(num, 32, seed=num)
    value, grads = loss_and_grads(ranking(order, 32, top_k), img, txt, 100.0, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(value)
    for grad in grads:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("spread", [1e3, 1e5])
def test_extreme_score_range_matches_loop(spread):
    gen = torch.Generator().manual_seed(0)
    scores = spread * torch.randn(4, 40, generator=gen, dtype=torch.float64)
    target = torch.randn(4, 40, generator=gen, dtype=torch.float64)
    scores.requires_grad_(True)
    value = plackett_luce_loss(scores, target)
    value.backward()
    assert value.item() == pytest.approx(listmle_loop(scores.detach(), target), rel=1e-12)
    assert torch.isfinite(scores.grad).all()
    # Each row's gradient sums to zero: every position's softmax sums to one.
    torch.testing.assert_close(scores.grad.sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)


def test_mixed_wide_and_narrow_rows_float32():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 30, generator=gen)
    scores[::2] *= 1e4  # rows past the float64 fast path's range go through logcumsumexp
    target = torch.randn(6, 30, generator=gen)
    scores.requires_grad_(True)
    value = plackett_luce_loss(scores, target)
    value.backward()
    assert value.item() == pytest.approx(listmle_loop(scores.detach().double(), target.double()), rel=1e-6)
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("top_k", [None, 3, 8])
def test_listmle_gradcheck(top_k):
    gen = torch.Generator().manual_seed(2)
    scores = (3 * torch.randn(3, 8, generator=gen, dtype=torch.float64)).requires_grad_(True)
    target = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: plackett_luce_loss(s, target, top_k), (scores,))


@pytest.mark.parametrize("order,top_k", [(1, None), (2, 3), (3, None), (4, 4)])
def test_ranking_loss_gradcheck(order, top_k):
    img, txt = unit_features(6, 5, seed=order, dtype=torch.float64)
    module = ranking(order, 5, top_k).double()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    # The transition parameters' gradients are checked in the chunked-kernel tests.
    assert torch.autograd.gradcheck(
        lambda i, t, s: module(i, t, s), (img, txt, scale), eps=1e-6, atol=1e-6, fast_mode=True
    )


@pytest.mark.parametrize("order,top_k", [(1, None), (1, 4), (3, 5), (4, None)])
def test_ranking_loss_permutation_equivariant(order, top_k):
    img, txt = unit_features(16, 12, seed=3, dtype=torch.float64)
    module = ranking(order, 12, top_k).double()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(25.0, dtype=torch.float64)
    torch.testing.assert_close(module(img[perm], txt[perm], scale), module(img, txt, scale), rtol=1e-12, atol=0)


def test_plackett_luce_permutation_equivariant():
    gen = torch.Generator().manual_seed(4)
    scores = 5 * torch.randn(5, 20, generator=gen, dtype=torch.float64)
    target = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    perm = torch.randperm(20, generator=gen)
    for top_k in (None, 6):
        moved = plackett_luce_loss(scores[:, perm], target[:, perm], top_k)
        torch.testing.assert_close(moved, plackett_luce_loss(scores, target, top_k), rtol=1e-12, atol=0)


def test_uniform_scores_give_log_factorial():
    # With equal scores every ranking is equally likely: NLL = log N!.
    scores = torch.zeros(2, 10)
    assert plackett_luce_loss(scores, torch.randn(2, 10)).item() == pytest.approx(math.lgamma(11), rel=1e-6)
