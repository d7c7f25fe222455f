"""``dinorankclip teacher-cache`` followed by ``dinorankclip train teacher.cache=DIR`` on the bundled Flickr8k data."""

from __future__ import annotations

import json

import pytest

from dinorankclip.cli.main import main
from dinorankclip.train.checkpoint import load_model

TEACHER_OVERRIDES = [
    "teacher.name=vit_small_patch16_dinov3",
    "teacher.weights=random",
    "teacher.image_size=32",
    "teacher.blocks=[0, 1]",
    "teacher.model_kwargs={depth: 2}",
]


def test_cache_then_train_on_flickr8k(tmp_path, sample_data, tiny_overrides, capsys):
    table = sample_data / "flickr8k" / "train.csv"
    cache = tmp_path / "cache"
    code = main(["teacher-cache", "--data", str(table), "--out", str(cache), "--pca-dim", "32",
                 "--pca-images", "64", "--batch-size", "128", *TEACHER_OVERRIDES])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["keys"] == 753  # distinct images of the 3765 caption rows
    assert summary["cached"] == 753

    run = tmp_path / "run"
    # teacher.weights=null: training from the cache needs no teacher weights, because it never builds the teacher.
    code = main(["train", "--config", "tiny-cpu", "--out", str(run), *tiny_overrides, f"data.train={table}",
                 f"teacher.cache={cache}", "teacher.weights=null"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"gram", "relational", "text_align"} <= set(records[-1])
    assert all(record["loss"] == pytest.approx(record["loss"]) for record in records)

    model, cfg = load_model(run)
    assert cfg.teacher.cache == str(cache)
    assert model.geometry.dim == 32  # the student projects into the cache's PCA space


def test_cache_command_rejects_shards(tmp_path, capsys):
    code = main(["teacher-cache", "--data", str(tmp_path / "train-{000..009}.tar"), "--out", str(tmp_path / "c"),
                 *TEACHER_OVERRIDES])
    assert code == 2
    assert "WebDataset shards are not supported yet" in capsys.readouterr().err


def test_cache_command_needs_teacher_weights(tmp_path, sample_data, capsys):
    code = main(["teacher-cache", "--data", str(sample_data / "flickr8k" / "train.csv"), "--out", str(tmp_path / "c")])
    assert code == 2
    assert "teacher.weights is not set" in capsys.readouterr().err
