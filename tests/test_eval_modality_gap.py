"""Four-node modality gap: the centroid-gap matrix, the fusion-free special case and the PCA plot."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.config import load_config
from dinorankclip.eval.features import Encoder
from dinorankclip.eval.modality_gap import NODES, gap_matrix, run_modality_gap
from dinorankclip.eval.runner import eval_views
from dinorankclip.models.dinorankclip import build_model
from dinorankclip.models.trunk import build_tokenizer
from dinorankclip.train.teacher_source import build_teacher_source


def test_gap_matrix_known_answer():
    # Each set contains one vector, so its centroid is that vector.
    sets = {"clip_image": torch.tensor([[1.0, 0.0]]), "fused_image": torch.tensor([[0.0, 1.0]]),
            "clip_text": torch.tensor([[-1.0, 0.0]]), "fused_text": torch.tensor([[1.0, 0.0]])}
    matrix = gap_matrix(sets)
    assert matrix.shape == (4, 4)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix.diagonal(), torch.zeros(4))
    assert matrix[0, 1].item() == pytest.approx(2 ** 0.5)
    assert matrix[0, 2].item() == pytest.approx(2.0)
    assert matrix[0, 3].item() == pytest.approx(0.0)


def test_gap_matrix_uses_centroids():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(50, 8), dim=-1)
    b = F.normalize(torch.randn(30, 8) + 2.0, dim=-1)
    sets = dict(zip(NODES, (a, b, a, b), strict=True))
    expected = (a.mean(0) - b.mean(0)).norm().item()
    assert gap_matrix(sets)[0, 1].item() == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, sample_data):
    rows = list(csv.DictReader((sample_data / "flickr8k" / "test.csv").open(newline="")))[:60]
    path = tmp_path_factory.mktemp("gap") / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "caption"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"filepath": str(sample_data / "flickr8k" / row["filepath"]), "caption": row["caption"]})
    return path


def _encoder(overrides):
    cfg = load_config(None, overrides)
    _, geometry = build_teacher_source(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, geometry)
    if model.fusion is not None:
        # The fusion output projections start at zero, so a new model equals the plain trunk. Random weights
        # make the fused nodes differ from the trunk nodes.
        for parameter in model.parameters():
            if parameter.dim() >= 2 and parameter.abs().sum() == 0:
                torch.nn.init.normal_(parameter, std=0.05)
    return Encoder(model, build_tokenizer(model.spec), torch.device("cpu"))


def test_modality_gap_with_fusion_writes_png(tmp_path, held_out, tiny_overrides):
    encoder = _encoder(list(tiny_overrides))
    png = tmp_path / "plots" / "gap.png"
    metrics = run_modality_gap(encoder, held_out, transform=eval_views(encoder.model), plot_path=png)
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["plot"] == str(png)
    assert metrics["nodes"] == list(NODES)
    assert metrics["num_pairs"] == 12  # 60 rows of the test table = 12 images with 5 captions each
    matrix = torch.tensor(metrics["matrix"])
    torch.testing.assert_close(matrix, matrix.T)
    assert metrics["gaps"]["clip_image|fused_image"] > 0
    assert metrics["teacher_space_gap"] is not None and metrics["teacher_space_gap"] >= 0
    assert set(metrics["centroid_norms"]) == set(NODES)


def test_modality_gap_without_fusion(held_out, tiny_overrides):
    encoder = _encoder(list(tiny_overrides) + ["fusion.variant=none"])
    metrics = run_modality_gap(encoder, held_out, transform=eval_views(encoder.model), plot_path=None,
                               max_pairs=5)
    assert metrics["num_pairs"] == 5
    assert metrics["plot"] is None
    assert metrics["teacher_space_gap"] is None
    assert metrics["gaps"]["clip_image|fused_image"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["gaps"]["clip_text|fused_text"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["gaps"]["clip_image|clip_text"] > 0
