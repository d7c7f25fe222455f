"""``dinorankclip teacher-cache`` followed by ``dinorankclip train teacher.cache=DIR`` on the bundled Flickr8k data."""

from __future__ import annotations

import json

import pytest

from dinorankclip.cli.main import main
from dinorankclip.data.pack import pack_shards
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


def test_cache_then_train_on_shards(tmp_path, sample_data, tiny_overrides, capsys):
    """Shards are cached by their __key__, and training from shards reads the cache by that key."""
    source = sample_data / "flickr8k"
    header, *rows = (source / "train.csv").read_text().splitlines()[:41]  # 40 pairs of 8 images
    table = tmp_path / "pairs.csv"  # absolute image paths, so the table can live outside the data folder
    table.write_text("\n".join([header] + [f"{source}/{row}" for row in rows]) + "\n")
    shards = tmp_path / "shards"
    packed = pack_shards(table, shards, shard_size=16)
    pattern = str(shards / "shard-{000000..000002}.tar")
    assert len(packed.shards) == 3

    cache = tmp_path / "cache"
    code = main(["teacher-cache", "--data", pattern, "--out", str(cache), "--pca-dim", "16", "--shard-size", "8",
                 *TEACHER_OVERRIDES])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["keys"] == 40  # one sample per caption row in packed shards
    assert summary["cached"] == 40

    run = tmp_path / "run"
    code = main(["train", "--config", "tiny-cpu", "--out", str(run), *tiny_overrides, f"data.train={pattern}",
                 f"teacher.cache={cache}", "teacher.weights=null", "data.shuffle_buffer=8"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "gram" in records[-1]


def test_cache_command_needs_teacher_weights(tmp_path, sample_data, capsys):
    code = main(["teacher-cache", "--data", str(sample_data / "flickr8k" / "train.csv"), "--out", str(tmp_path / "c")])
    assert code == 2
    assert "teacher.weights is not set" in capsys.readouterr().err


def test_train_on_table_with_images_the_cache_skipped(tmp_path, sample_data, tiny_overrides, capsys):
    """Rows whose image the cache build could not read train like any unreadable image: skipped and counted."""
    source = sample_data / "flickr8k"
    header, *rows = (source / "train.csv").read_text().splitlines()[:13]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    table = tmp_path / "corrupt.csv"
    table.write_text("\n".join([header] + [f"{source}/{row}" for row in rows]) + "\nbad.jpg,a caption\n"
                     "empty.jpg,another caption\n")
    cache = tmp_path / "cache"
    code = main(["teacher-cache", "--data", str(table), "--out", str(cache), "--pca-dim", "16",
                 "data.max_bad_fraction=0.5", *TEACHER_OVERRIDES])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["bad"] == 2

    run = tmp_path / "run"
    # A batch of all 14 rows: each step meets both unreadable images.
    code = main(["train", "--config", "tiny-cpu", "--out", str(run), *tiny_overrides, f"data.train={table}",
                 f"teacher.cache={cache}", "teacher.weights=null", "data.max_bad_fraction=0.5",
                 "train.batch_size=14"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["samples_skipped"] == 4
    assert records[-1]["skipped_decode_error"] == 2
    assert records[-1]["skipped_empty_image"] == 2


def test_shard_key_in_two_shards_rejected(tmp_path, sample_data, capsys):
    """Two packs joined with :: both number their samples from 0, so their keys collide."""
    source = sample_data / "flickr8k"
    header, *rows = (source / "train.csv").read_text().splitlines()[:9]
    table = tmp_path / "pairs.csv"
    table.write_text("\n".join([header] + [f"{source}/{row}" for row in rows]) + "\n")
    pack_shards(table, tmp_path / "a", shard_size=8)
    pack_shards(table, tmp_path / "b", shard_size=8)
    joined = f"{tmp_path / 'a' / 'shard-000000.tar'}::{tmp_path / 'b' / 'shard-000000.tar'}"

    code = main(["teacher-cache", "--data", joined, "--out", str(tmp_path / "cache"), "--pca-dim", "8",
                 *TEACHER_OVERRIDES])
    assert code == 2
    message = capsys.readouterr().err
    assert "sample key '000000000' occurs in shard" in message
    assert "b/shard-000000.tar" in message
    assert "unique key" in message
    assert not (tmp_path / "cache" / "manifest.json").exists()
