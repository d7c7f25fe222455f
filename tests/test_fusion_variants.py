"""Every fusion variant and injection source trains from the config on real Flickr8k images."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from dinorankclip.config import load_config
from dinorankclip.eval.runner import build_encoder
from dinorankclip.train.checkpoint import load_model
from dinorankclip.train.teacher_source import build_teacher_source
from dinorankclip.train.trainer import seed_everything, train

VARIANTS = ["full", "no_pyramid", "no_channel_spatial", "image_only", "no_refiner", "no_gate", "none"]
DISTILL_TERMS = {"gram", "relational", "text_align"}


def _train(tmp_path, tiny_overrides, sample_data, *extra):
    cfg = load_config(None, list(tiny_overrides) + [
        f"data.train={sample_data / 'flickr8k' / 'train.csv'}",
        f"train.output_dir={tmp_path / 'run'}",
        *extra,
    ])
    summary = train(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_from_config(tmp_path, tiny_overrides, sample_data, variant):
    summary, records = _train(tmp_path, tiny_overrides, sample_data, f"fusion.variant={variant}")
    assert summary["steps"] == 2
    assert all(record["loss"] == pytest.approx(record["loss"]) for record in records)  # finite, not NaN
    terms = set(records[-1])

    if variant == "none":
        assert not terms & (DISTILL_TERMS | {"gate_l1", "gate_mean"})
    elif variant == "image_only":
        assert {"gram", "relational", "gate_l1"} <= terms
        assert "text_align" not in terms
    elif variant == "no_gate":
        assert DISTILL_TERMS <= terms
        assert not terms & {"gate_l1", "gate_mean"}
    else:
        assert DISTILL_TERMS | {"gate_l1"} <= terms

    model, cfg = load_model(tmp_path / "run")
    assert cfg.fusion.variant == variant
    assert (model.fusion is None) == (variant == "none")


def test_teacher_injection_trains_and_evaluates(tmp_path, tiny_overrides, sample_data):
    """fusion.injection_source=teacher: no student image branch, teacher tokens feed the fusion directly."""
    summary, records = _train(tmp_path, tiny_overrides, sample_data, "fusion.injection_source=teacher")
    assert summary["steps"] == 2
    assert "gram" not in records[-1]  # no student image branch to distil into
    assert "text_align" in records[-1]
    model, _ = load_model(tmp_path / "run")
    assert model.student_image is None
    assert model.fusion is not None

    # Evaluation rebuilds the random teacher that training used, and --teacher-weights replaces its path.
    first, _ = build_encoder(tmp_path / "run", torch.device("cpu"))
    second, cfg = build_encoder(tmp_path / "run", torch.device("cpu"))
    trained = first.teacher.teacher.model.state_dict()
    seed_everything(cfg.train.seed)
    online, _ = build_teacher_source(cfg, torch.device("cpu"))
    for name, tensor in trained.items():
        torch.testing.assert_close(second.teacher.teacher.model.state_dict()[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(online.teacher.model.state_dict()[name], tensor, rtol=0, atol=0)

    moved = tmp_path / "moved_teacher.safetensors"
    changed = {name: tensor + 1 for name, tensor in trained.items()}
    safetensors.torch.save_file(changed, str(moved))
    third, _ = build_encoder(tmp_path / "run", torch.device("cpu"), teacher_weights=str(moved))
    for name, tensor in changed.items():
        torch.testing.assert_close(third.teacher.teacher.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_gate_output_none_without_gate(tiny_overrides):
    from dinorankclip.models.dinorankclip import TeacherGeometry, build_model
    from dinorankclip.models.trunk import build_tokenizer

    geometry = TeacherGeometry(dim=48, grid=(2, 2), blocks=(0, 1), depth=2, image_size=32)
    model = build_model(load_config(None, list(tiny_overrides) + ["fusion.variant=no_gate"]), geometry).eval()
    text = build_tokenizer(model.spec)(["a dog", "a cat"])
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), text, torch.rand(2, 3, 32, 32))
    assert out["image_gate"] is None
    assert out["text_gate"] is None
