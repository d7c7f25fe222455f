"""RankingLoss: RankCLIP's four lists, order nesting, transition terms against loop references."""

import math

import pytest
import torch
from conftest import unit_features
from test_loss_plackett_luce import listmle_loop

from dinorankclip.losses import RankingLoss, descending_order, transition_nll


def four_lists(img, txt, scale):
    cross_img, cross_txt = scale * img @ txt.T, scale * txt @ img.T
    in_img, in_txt = scale * img @ img.T, scale * txt @ txt.T
    return (cross_img, cross_txt), (cross_txt, cross_img), (in_img, in_txt), (in_txt, in_img)


def set_scales(loss: RankingLoss, values: dict[int, float]) -> None:
    """Set the transition scale α_r of every head for each order r in ``values``."""
    with torch.no_grad():
        for order, value in values.items():
            loss.transition.scale[order - 2].fill_(value)


def test_order1_matches_rankclip_lists_in_float64():
    img, txt = unit_features(10, 8, seed=0, dtype=torch.float64)
    scale = 30.0
    lists = [listmle_loop(s, t) / img.shape[0] for s, t in four_lists(img, txt, scale)]
    want = 0.5 * (lists[0] + lists[1]) + 0.5 * (lists[2] + lists[3])
    got = RankingLoss(1, 8)(img, txt, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_order0_is_zero():
    img, txt = unit_features(5, 8, seed=1)
    assert RankingLoss(0, 8)(img, txt, 10.0).item() == 0.0


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("top_k", [None, 4])
def test_zero_top_scale_equals_order_below(order, top_k):
    img, txt = unit_features(12, 16, seed=order, dtype=torch.float64)
    scale = torch.tensor(20.0, dtype=torch.float64)
    torch.manual_seed(0)
    upper = RankingLoss(order, 16, top_k, heads=2, head_dim=8).double()
    lower = RankingLoss(order - 1, 16, top_k, heads=2, head_dim=8).double()
    if order > 2:
        lower.transition.load_state_dict(
            {k: v for k, v in upper.transition.state_dict().items() if _belongs_below(k, order)}
        )
        set_scales(upper, {r: 0.7 for r in range(2, order)})
        set_scales(lower, {r: 0.7 for r in range(2, order)})
    got, want = upper(img, txt, scale), lower(img, txt, scale)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def _belongs_below(key: str, order: int) -> bool:
    # Parameter names are "<kind>.<order - 2>[.weight]".
    return int(key.split(".")[1]) < order - 2


def test_default_scales_start_at_zero():
    loss = RankingLoss(4, 16, heads=3, head_dim=4)
    for scale in loss.transition.scale:
        assert torch.equal(scale, torch.zeros(3))


def transition_loop(scores, order, heads_module, candidates):
    """Per-row order-R NLL from the definition, with explicit concatenation of placed items."""
    mod = heads_module
    num_rows, num_pos = order.shape
    out = torch.zeros(num_rows, dtype=torch.float64)
    zero = torch.zeros_like(candidates[0])
    for q in range(num_rows):
        ranking = order[q].tolist()
        for j in range(num_pos):
            remaining = [d for d in range(scores.shape[1]) if d not in ranking[:j]]
            utils = []
            for d in remaining:
                u = scores[q, d].clone()
                for r in range(2, mod.order + 1):
                    prev = [candidates[ranking[j - lag]] if j - lag >= 0 else zero for lag in range(r - 1, 0, -1)]
                    query = mod.query[r - 2](torch.cat(prev)).view(mod.heads, mod.head_dim)
                    key = mod.key[r - 2](candidates[d]).view(mod.heads, mod.head_dim)
                    per_head = (query * key).sum(1) / math.sqrt(mod.head_dim)
                    u = u + (mod.scale[r - 2] * per_head).sum()
                utils.append(u)
            utils = torch.stack(utils)
            chosen = utils[remaining.index(ranking[j])]
            out[q] += torch.logsumexp(utils, 0) - chosen
    return out


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("top_k", [None, 3])
def test_transition_nll_matches_loop(order, top_k):
    torch.manual_seed(order)
    loss = RankingLoss(order, 6, top_k, heads=2, head_dim=3).double()
    set_scales(loss, {r: 0.5 + 0.3 * r for r in range(2, order + 1)})
    cand = torch.randn(7, 6, dtype=torch.float64)
    scores = 3 * torch.randn(4, 7, dtype=torch.float64)
    ranking = descending_order(torch.randn(4, 7), top_k)
    queries, keys = loss.transition.lag_factors(cand)
    got = transition_nll(scores, ranking, queries, keys)
    want = transition_loop(scores, ranking, loss.transition, cand)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 3])
def test_top_k_equal_to_n_matches_no_truncation(order):
    img, txt = unit_features(9, 16, seed=5, dtype=torch.float64)
    torch.manual_seed(0)
    full = RankingLoss(order, 16).double()
    truncated = RankingLoss(order, 16, top_k=9).double()
    truncated.load_state_dict(full.state_dict())
    if order > 1:
        set_scales(full, {2: 0.4, 3: -0.6})
        set_scales(truncated, {2: 0.4, 3: -0.6})
    torch.testing.assert_close(truncated(img, txt, 15.0), full(img, txt, 15.0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("order", [-1, 5, 1.0])
def test_invalid_order_rejected(order):
    with pytest.raises(ValueError, match="order"):
        RankingLoss(order, 8)


def _grads_with_detach(detach: bool, scale_value: float):
    img, txt = unit_features(10, 8, seed=11, dtype=torch.float64)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    torch.manual_seed(0)
    loss = RankingLoss(3, 8, 5, heads=2, head_dim=4, detach=detach).double()
    set_scales(loss, {2: scale_value, 3: scale_value})
    value = loss(img, txt, torch.tensor(12.0, dtype=torch.float64))
    grads = torch.autograd.grad(value, [img, txt, *loss.parameters()])
    return value, grads[:2], grads[2:]


def test_detach_stops_only_the_transition_input_gradient():
    value, feature_grads, head_grads = _grads_with_detach(False, 0.8)
    value_d, feature_grads_d, head_grads_d = _grads_with_detach(True, 0.8)
    torch.testing.assert_close(value_d, value, rtol=0, atol=0)
    for got, want in zip(head_grads_d, head_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert (feature_grads_d[0] - feature_grads[0]).abs().max() > 1e-6


def test_detach_changes_nothing_at_zero_scales():
    _, feature_grads, _ = _grads_with_detach(False, 0.0)
    _, feature_grads_d, _ = _grads_with_detach(True, 0.0)
    for got, want in zip(feature_grads_d, feature_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_width_mismatch_names_embed_dim():
    features = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
    with pytest.raises(ValueError, match=r"width 32 do not match RankingLoss\(embed_dim=16\)"):
        RankingLoss(order=3, embed_dim=16)(features, features, 10.0)


def test_half_features_without_autocast():
    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    loss = RankingLoss(order=3, embed_dim=16)
    expected = loss(features.half().float(), features.half().float(), 10.0)
    torch.testing.assert_close(loss(features.half(), features.half(), 10.0).float(), expected, atol=2e-2, rtol=2e-2)
