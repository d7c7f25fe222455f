"""Model: trunk, student, fusion and the conflict-aware gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.config import FusionConfig, load_config
from dinorankclip.models.dinorankclip import TeacherGeometry, build_model
from dinorankclip.models.fusion import ConflictGate, orthogonal_inject
from dinorankclip.models.student import pair_blocks
from dinorankclip.models.trunk import build_tokenizer

GEOMETRY = TeacherGeometry(dim=48, grid=(2, 2), blocks=(0, 1), depth=2, image_size=32)


def _model(overrides, *extra):
    cfg = load_config(None, list(overrides) + list(extra))
    torch.manual_seed(0)
    return build_model(cfg, GEOMETRY).eval(), cfg


def _inputs(model, batch=4):
    tokens = build_tokenizer(model.spec)(["a dog runs", "two people", "a red car", "snow"][:batch])
    image = torch.randn(batch, 3, model.spec.image_size, model.spec.image_size)
    view = torch.rand(batch, 3, GEOMETRY.image_size, GEOMETRY.image_size)
    return image, tokens, view


def test_gate_at_init_keeps_trunk_embedding(tiny_overrides):
    model, _ = _model(tiny_overrides)
    image, text, view = _inputs(model)
    with torch.no_grad():
        out = model(image, text, view)
    torch.testing.assert_close(out["image_features"], out["clip_image_features"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["text_features"], out["clip_text_features"], rtol=0, atol=1e-6)
    assert out["student_patch_levels"][0].shape == (4, 4, 48)
    assert out["image_gate"].shape == out["image_features"].shape


def test_fused_embeddings_unit_norm_after_training_residual(tiny_overrides):
    model, _ = _model(tiny_overrides)
    torch.nn.init.normal_(model.fusion.out_proj.weight, std=0.5)
    image, text, view = _inputs(model)
    with torch.no_grad():
        out = model(image, text, view)
    assert not torch.allclose(out["image_features"], out["clip_image_features"])
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)


def test_alignment_change_is_second_order():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(16, 32, dtype=torch.float64), dim=-1)
    gated = torch.randn(16, 32, dtype=torch.float64)
    ratios = []
    for eps in (1e-2, 1e-3, 1e-4):
        fused = orthogonal_inject(z, eps * gated)
        one_minus_cos = 1 - (fused * z).sum(-1)
        ratios.append(one_minus_cos / eps**2)
    # 1 - cos(z_fused, z) = |delta|^2 / 2 + O(eps^4): the ratio to eps^2 is constant.
    torch.testing.assert_close(ratios[1], ratios[2], rtol=1e-4, atol=0)
    torch.testing.assert_close(ratios[0], ratios[2], rtol=1e-2, atol=0)
    assert (ratios[2] > 0).all()


def test_gate_scaled_by_eps_in_model(tiny_overrides):
    model, _ = _model(tiny_overrides)
    torch.nn.init.normal_(model.fusion.out_proj.weight, std=0.5)
    image, _, view = _inputs(model)
    with torch.no_grad():
        out = model.encode_image_all(image, view)
    z = F.normalize(out["clip_image_features"].double(), dim=-1)
    r, g = out["image_residual"].double(), out["image_gate"].double()
    scale = 0.1 / (g * r).norm(dim=-1).mean()  # eps = 1 then gives a residual of norm about 0.1
    gaps = [(1 - (orthogonal_inject(z, eps * scale * g * r) * z).sum(-1)).mean() for eps in (1.0, 0.1, 0.01)]
    assert gaps[0] > 0
    assert gaps[1] / gaps[0] == pytest.approx(1e-2, rel=0.02)
    assert gaps[2] / gaps[1] == pytest.approx(1e-2, rel=2e-4)


def test_conflict_closes_gate():
    torch.manual_seed(0)
    gate = ConflictGate(16, 32)
    z = F.normalize(torch.randn(3, 16), dim=-1)
    fused, g = gate(z, -2.0 * z)  # residual points straight against the trunk embedding
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-7)
    torch.testing.assert_close(fused, z, rtol=0, atol=1e-6)
    _, g_aligned = gate(z, 2.0 * z)
    assert (g_aligned > 0).all()


def test_no_gate_variant_adds_plainly():
    gate = ConflictGate(8, 8, enabled=False)
    z = F.normalize(torch.randn(2, 8), dim=-1)
    r = torch.randn(2, 8)
    fused, g = gate(z, r)
    torch.testing.assert_close(fused, F.normalize(z + r, dim=-1))
    assert torch.equal(g, torch.ones_like(r))


def test_image_only_has_no_text_branch(tiny_overrides):
    model, _ = _model(tiny_overrides, "fusion.variant=image_only")
    assert model.student_text is None and model.text_residual is None
    image, text, view = _inputs(model)
    with torch.no_grad():
        out = model(image, text, view)
    torch.testing.assert_close(out["text_features"], out["clip_text_features"], rtol=0, atol=0)
    assert out["text_student"] is None


@pytest.mark.parametrize("variant", ["full", "no_pyramid", "no_channel_spatial", "image_only", "no_refiner", "no_gate"])
def test_every_variant_builds_and_runs(tiny_overrides, variant):
    model, _ = _model(tiny_overrides, f"fusion.variant={variant}")
    image, text, view = _inputs(model, 2)
    out = model(image, text, view)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert out["image_features"].shape == (2, model.spec.embed_dim)


def test_none_variant_is_plain_trunk(tiny_overrides):
    model, _ = _model(tiny_overrides, "fusion.variant=none")
    assert model.fusion is None and model.student_image is None
    image, text, _ = _inputs(model, 2)
    out = model(image, text)
    torch.testing.assert_close(out["image_features"], out["clip_image_features"], rtol=0, atol=0)


def test_teacher_injection_needs_tokens(tiny_overrides):
    model, _ = _model(tiny_overrides, "fusion.injection_source=teacher")
    assert model.student_image is None
    image, text, _ = _inputs(model, 2)
    with pytest.raises(ValueError, match="teacher tokens"):
        model(image, text)
    levels = tuple(torch.randn(2, 4, 48) for _ in range(2))
    out = model(image, text, teacher_levels=levels)
    assert out["image_features"].shape == (2, model.spec.embed_dim)


def test_logit_scale_clamped(tiny_overrides):
    model, _ = _model(tiny_overrides)
    with torch.no_grad():
        model.trunk.logit_scale.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(100.0)
    model.clamp_logit_scale()
    assert model.trunk.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_pair_blocks_relative_depth():
    assert pair_blocks([3, 7, 11], 12, 12) == [3, 7, 11]
    assert pair_blocks([5, 11], 12, 4) == [1, 3]


def test_fusion_config_rejects_bad_width():
    with pytest.raises(ValueError, match="refiner_heads"):
        FusionConfig(width=30, refiner_heads=4)
