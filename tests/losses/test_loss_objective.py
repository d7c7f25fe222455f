"""Objective: term selection by loss name and order, weights, ramp, and output keys."""

from types import SimpleNamespace

import pytest
import torch
from conftest import unit_features

from dinorankclip.losses import LOSS_DEFAULTS, Objective, clip_loss, cyclip_loss, gram_loss


def loss_cfg(**overrides):
    return SimpleNamespace(**{**LOSS_DEFAULTS, **overrides})


def model_outputs(num=8, dim=16, *, seed=0, student=False):
    img, txt = unit_features(num, dim, seed=seed)
    out = {
        "image_features": img.requires_grad_(True),
        "text_features": txt.requires_grad_(True),
        "clip_image_features": img,
        "clip_text_features": txt,
        "logit_scale": torch.tensor(14.0),
        "image_gate": None,
        "text_gate": None,
        "student_patch_levels": None,
        "student_global": None,
        "text_student": None,
    }
    if student:
        gen = torch.Generator().manual_seed(seed)
        out["image_gate"] = torch.rand(num, dim, generator=gen)
        out["student_patch_levels"] = (torch.randn(num, 4, 12, generator=gen),)
        out["student_global"] = torch.randn(num, 12, generator=gen)
        out["text_student"] = torch.randn(num, 12, generator=gen)
    return out


def teacher_output(num=8, *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    patch = torch.randn(num, 4, 12, generator=gen)
    return SimpleNamespace(cls=torch.randn(num, 12, generator=gen), patch=patch, patch_levels=(patch,))


def test_clip_objective_equals_clip_loss():
    out = model_outputs()
    result = Objective(loss_cfg(name="clip"), 16)(out, None, progress=0.5)
    want = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
    torch.testing.assert_close(result["loss"], want)
    assert set(result) == {"loss", "clip"}


def test_cyclip_objective_equals_cyclip_loss():
    out = model_outputs()
    result = Objective(loss_cfg(name="cyclip"), 16)(out, None, progress=0.5)
    want = cyclip_loss(out["image_features"], out["text_features"], out["logit_scale"])
    torch.testing.assert_close(result["loss"], want)
    assert {"cyclic_in", "cyclic_cross"} <= set(result)


@pytest.mark.parametrize("name,order", [("rankclip", 1), ("dinorankclip", 3), ("clip", 0)])
def test_default_order_per_name(name, order):
    assert Objective(loss_cfg(name=name), 16).order == order


def test_rank_weight_ramps_linearly():
    out = model_outputs()
    objective = Objective(loss_cfg(name="rankclip", rank_weight=0.5, rank_warmup_fraction=0.5), 16)
    start = objective(out, None, progress=0.0)
    middle = objective(out, None, progress=0.25)
    end = objective(out, None, progress=0.9)
    torch.testing.assert_close(start["loss"], start["clip"])
    assert middle["rank_weight"].item() == pytest.approx(0.25)
    assert end["rank_weight"].item() == pytest.approx(0.5)
    ranking = end["rank_cross"] + end["rank_in"]
    torch.testing.assert_close(end["loss"].detach(), end["clip"] + 0.5 * ranking)


def test_dinorankclip_adds_distillation_terms():
    out = model_outputs(student=True)
    teacher = teacher_output()
    cfg = loss_cfg(name="dinorankclip", gram_weight=2.0, relational_weight=0.0, gate_l1_weight=0.5)
    result = Objective(cfg, 16)(out, teacher, progress=1.0)
    expected_keys = {"loss", "clip", "rank_cross", "rank_in", "rank_weight", "gram", "relational", "text_align",
                     "transition_scale_2", "transition_scale_3"}
    assert expected_keys | {"gate_l1"} == set(result)
    torch.testing.assert_close(result["gram"], gram_loss(out["student_patch_levels"], teacher.patch_levels))
    want = (
        result["clip"]
        + result["rank_weight"] * (result["rank_cross"] + result["rank_in"])
        + 2.0 * result["gram"]
        + result["text_align"]
        + 0.5 * result["gate_l1"]
    )
    torch.testing.assert_close(result["loss"].detach(), want)


def test_logged_terms_are_detached_and_loss_has_gradient():
    out = model_outputs(student=True)
    result = Objective(loss_cfg(), 16)(out, teacher_output(), progress=1.0)
    assert result["loss"].requires_grad
    assert all(not value.requires_grad for key, value in result.items() if key != "loss")


@pytest.mark.parametrize(
    "field,value",
    [("name", "siglip"), ("rank_weight", -1.0), ("gram_weight", float("nan")), ("order", 7), ("top_k", 0)],
)
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field if field not in ("order", "top_k") else "ranking"):
        Objective(loss_cfg(**{field: value}), 16)


def test_alip_objective_requires_second_captions():
    objective = Objective(loss_cfg(name="alip"), 16)
    with pytest.raises(ValueError, match="second_text_features.*data.second_caption_column"):
        objective(model_outputs(), None, progress=0.0)


def test_alip_objective_logs_parts():
    out = model_outputs()
    out["second_text_features"] = out["text_features"].detach().flip(0)
    result = Objective(loss_cfg(name="alip"), 16)(out, None, progress=0.0)
    torch.testing.assert_close(result["loss"].detach(), result["alip_image_text"] + result["alip_image_caption"])
    assert "clip" not in result


@pytest.mark.parametrize("order", [1, 3])
def test_default_rank_weight_below_clip(order):
    # A tiny random model at batch 128: the ranking gradient at the default weight stays well below
    # CLIP's, so the ranking term cannot swamp it at the start of training.
    torch.manual_seed(0)
    inputs = torch.randn(128, 32), torch.randn(128, 32)
    towers = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64)
    params = [p for tower in towers for p in tower.parameters()]
    img, txt = (torch.nn.functional.normalize(tower(x), dim=1) for tower, x in zip(towers, inputs, strict=True))
    objective = Objective(loss_cfg(name="dinorankclip", order=order, top_k=32), 64)
    for scale in objective.ranking.transition.scale if objective.ranking.transition is not None else ():
        torch.nn.init.constant_(scale, 0.5)
    scale = torch.tensor(1 / 0.07)
    clip_grad = torch.autograd.grad(clip_loss(img, txt, scale), params, retain_graph=True)
    rank = LOSS_DEFAULTS["rank_weight"] * objective.ranking(img, txt, scale)
    rank_grad = torch.autograd.grad(rank, params)
    clip_norm = torch.sqrt(sum(g.square().sum() for g in clip_grad))
    rank_norm = torch.sqrt(sum(g.square().sum() for g in rank_grad))
    assert rank_norm > 0.01 * clip_norm  # the ranking term does contribute
    assert rank_norm < 0.25 * clip_norm


def test_transition_scales_logged_per_order():
    objective = Objective(loss_cfg(order=4), 16)
    result = objective(model_outputs(), None, progress=1.0)
    assert {"transition_scale_2", "transition_scale_3", "transition_scale_4"} <= set(result)
    assert float(result["transition_scale_3"]) == 0.0
    with torch.no_grad():
        objective.ranking.transition.scale[1].fill_(-0.5)
    result = objective(model_outputs(), None, progress=1.0)
    assert float(result["transition_scale_3"]) == pytest.approx(0.5)
    assert float(result["transition_scale_2"]) == 0.0
