"""CLIP and CyCLIP losses against open_clip and float64 loop references."""

import pytest
import torch
from conftest import unit_features
from open_clip.loss import ClipLoss

from dinorankclip.losses import AlipLoss, check_alip_columns, clip_loss, cyclic_terms, cyclip_loss


@pytest.mark.parametrize("num", [1, 7, 64])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-13), (torch.float32, 1e-5, 2e-6)])
def test_clip_loss_matches_open_clip(num, scale, dtype, rtol, atol):
    img, txt = unit_features(num, 32, seed=num, dtype=dtype)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    logit_scale = torch.tensor(scale, dtype=dtype)
    ours = clip_loss(img, txt, logit_scale)
    ours_grad = torch.autograd.grad(ours, (img, txt))
    ref = ClipLoss()(img, txt, logit_scale)
    ref_grad = torch.autograd.grad(ref, (img, txt))
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    for got, want in zip(ours_grad, ref_grad, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_clip_loss_rejects_mismatched_shapes():
    img, txt = unit_features(4, 8, seed=0)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(img, txt[:3], 10.0)


def test_clip_loss_rejects_empty_and_integer_features():
    with pytest.raises(ValueError, match="batch size 0"):
        clip_loss(torch.zeros(0, 8), torch.zeros(0, 8), 10.0)
    with pytest.raises(ValueError, match="must be a floating-point tensor, got torch.int64"):
        clip_loss(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8), 10.0)


@pytest.mark.parametrize("scale", [0.0, -10.0, float("nan"), float("inf"), torch.tensor(-1.0), torch.ones(2)])
def test_clip_loss_rejects_bad_logit_scale(scale):
    img, txt = unit_features(4, 8, seed=0)
    with pytest.raises(ValueError, match="logit_scale must be"):
        clip_loss(img, txt, scale)


def test_clip_loss_mixed_dtypes():
    """Features of two float dtypes are an error outside autocast and accepted inside it."""
    img, txt = unit_features(4, 8, seed=0)
    with pytest.raises(ValueError, match=r"torch.float32 but text_features is torch.float64. Cast both"):
        clip_loss(img, txt.double(), 10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(img, txt.bfloat16(), 10.0)
    assert torch.isfinite(loss)


def _cyclic_loop(img, txt):
    num = img.shape[0]
    in_modal = cross_modal = 0.0
    for j in range(num):
        for k in range(num):
            in_modal += (img[j] @ img[k] - txt[j] @ txt[k]) ** 2
            cross_modal += (img[j] @ txt[k] - img[k] @ txt[j]) ** 2
    return in_modal / num, cross_modal / num


def test_cyclic_terms_match_loop():
    img, txt = unit_features(9, 16, seed=3, dtype=torch.float64)
    in_modal, cross_modal = cyclic_terms(img, txt)
    ref_in, ref_cross = _cyclic_loop(img, txt)
    torch.testing.assert_close(in_modal, ref_in, rtol=1e-12, atol=0)
    torch.testing.assert_close(cross_modal, ref_cross, rtol=1e-12, atol=0)


def test_cyclip_loss_combines_terms():
    img, txt = unit_features(12, 16, seed=4, dtype=torch.float64)
    scale = torch.tensor(20.0, dtype=torch.float64)
    in_modal, cross_modal = cyclic_terms(img, txt)
    want = clip_loss(img, txt, scale) + 0.25 * in_modal + 0.25 * cross_modal
    torch.testing.assert_close(cyclip_loss(img, txt, scale), want, rtol=1e-12, atol=0)


def _alip_reference(img, txt, cap, scale, means, ema):
    """ALIP's loss from its definition, with the running means updated first."""
    num = img.shape[0]
    sims = {"tc": (txt * cap).sum(1), "it": (img * txt).sum(1), "ic": (img * cap).sum(1)}
    means = {key: ema * means[key] + (1 - ema) * sims[key].mean() for key in sims}
    total = 0.0
    for i in range(num):
        sample = min(torch.exp(sims["tc"][i] - means["tc"]).item() ** 2, 1.0)
        for key, texts in (("it", txt), ("ic", cap)):
            pair = torch.exp(sims[key][i] - means[key]).item() ** 2 if sample < 1.0 else 1.0
            ce_image = -torch.log_softmax(scale * img[i] @ texts.T, 0)[i]
            ce_text = -torch.log_softmax(scale * texts[i] @ img.T, 0)[i]
            total += sample * pair * 0.5 * (ce_image + ce_text) / num
    return total, means


def test_alip_loss_matches_reference_over_two_steps():
    img, txt = unit_features(6, 8, seed=7, dtype=torch.float64)
    cap, _ = unit_features(6, 8, seed=8, dtype=torch.float64)
    loss = AlipLoss(ema=0.9)
    means = {"tc": 1.0, "it": 1.0, "ic": 1.0}
    for step in range(2):
        got = loss(img, txt, cap, 10.0)
        want, means = _alip_reference(img, txt, cap, 10.0, means, 0.9)
        assert got["loss"].item() == pytest.approx(want.item(), rel=1e-6), step
    assert loss.mean_text_caption.item() == pytest.approx(float(means["tc"]), rel=1e-6)


def test_alip_eval_mode_keeps_running_means():
    img, txt = unit_features(4, 8, seed=9)
    loss = AlipLoss().eval()
    loss(img, txt, txt.flip(0), 10.0)
    assert loss.mean_image_text.item() == 1.0


def test_alip_missing_column_error_names_column_and_fix():
    check_alip_columns(["filepath", "caption", "caption2"], "caption2")
    with pytest.raises(ValueError, match=r"'caption2'.*data.second_caption_column.*add that column"):
        check_alip_columns(["filepath", "caption"], "caption2")
    with pytest.raises(ValueError, match="data.second_caption_column is not set"):
        check_alip_columns(["filepath", "caption"], None)
