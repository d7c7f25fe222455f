"""Checkpoints never hold teacher weights, and a student-injection model evaluates without the teacher file."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from tiny_dinov3 import TINY_KWARGS, make_tiny_model

from dinorankclip.cli.main import main
from dinorankclip.config import load_config
from dinorankclip.train.checkpoint import load_model
from dinorankclip.train.trainer import train

TEACHER_NAME = "vit_small_patch16_dinov3"
# Teacher tensors this small (norm scales, biases) could equal a student tensor by chance, e.g. all ones.
MIN_COMPARED_NUMEL = 64


@pytest.fixture()
def teacher_file(tmp_path):
    path = tmp_path / "dinov3_tiny.safetensors"
    safetensors.torch.save_file(make_tiny_model(TEACHER_NAME, seed=3).state_dict(), str(path))
    return path


def _train(tmp_path, tiny_overrides, sample_data, teacher_file, *extra):
    kwargs = ", ".join(f"{key}: {value}" for key, value in TINY_KWARGS.items())
    run = tmp_path / "run"
    cfg = load_config(None, list(tiny_overrides) + [
        f"teacher.weights={teacher_file}",
        f"teacher.model_kwargs={{{kwargs}}}",
        f"data.train={sample_data / 'flickr8k' / 'train.csv'}",
        f"train.output_dir={run}",
        *extra,
    ])
    train(cfg)
    return run


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_checkpoint_has_no_teacher_tensor(tmp_path, tiny_overrides, sample_data, teacher_file, source):
    run = _train(tmp_path, tiny_overrides, sample_data, teacher_file, f"fusion.injection_source={source}")
    checkpoint = safetensors.torch.load_file(str(run / "model.safetensors"))
    teacher_state = safetensors.torch.load_file(str(teacher_file))

    assert not [key for key in checkpoint if key.startswith("teacher") or ".teacher." in key]
    for name, tensor in teacher_state.items():
        if tensor.numel() < MIN_COMPARED_NUMEL:
            continue
        same = [key for key, value in checkpoint.items() if value.shape == tensor.shape and torch.equal(value, tensor)]
        assert not same, f"teacher tensor {name} is stored in the checkpoint as {same}"

    model, _ = load_model(run)
    assert sum(v.numel() for v in checkpoint.values()) == sum(v.numel() for v in model.state_dict().values())


def test_student_model_evaluates_without_teacher_file(tmp_path, tiny_overrides, sample_data, teacher_file):
    run = _train(tmp_path, tiny_overrides, sample_data, teacher_file)
    teacher_file.unlink()

    model, cfg = load_model(run)
    assert cfg.fusion.injection_source == "student"
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.encode_image(image, teacher_view=torch.rand(2, 3, 32, 32))
    assert features.shape == (2, model.spec.embed_dim)

    results = tmp_path / "results.json"
    code = main(["eval", "--checkpoint", str(run), "--retrieval", str(sample_data / "flickr8k" / "test.csv"),
                 "--workers", "0", "--out", str(results)])
    assert code == 0
    assert results.is_file()
