"""Evaluation on bad input: unreadable images, bad templates, malformed Karpathy JSON, bad labels, name clashes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from table_helpers import read_rows, write_table

from dinorankclip.cli.eval_cmd import eval_config_from_args
from dinorankclip.config import ConfigError, EvalConfig, load_config
from dinorankclip.eval.captions import open_captions
from dinorankclip.eval.modality_gap import run_modality_gap
from dinorankclip.eval.probe import run_probe
from dinorankclip.eval.prompts import resolve_prompts
from dinorankclip.eval.runner import evaluate, run_retrieval, run_zeroshot


@pytest.fixture
def no_encoding(encoder, monkeypatch):
    """Make any image encoding fail, for checks that must run before it."""

    def fail(*args, **kwargs):
        raise AssertionError("images were encoded before the input was checked")

    monkeypatch.setattr(encoder, "images", fail)
    return encoder


def _cifar_labels(tmp_path: Path, sample_data: Path, *, num_rows: int, num_missing: int,
                  label: str | None = None) -> Path:
    """Write a labels CSV of ``num_rows`` CIFAR-10 test images whose first ``num_missing`` paths do not exist."""
    rows = read_rows(sample_data / "cifar10" / "test.csv")[::10][:num_rows]
    for i, row in enumerate(rows):
        folder = tmp_path / "missing" if i < num_missing else sample_data / "cifar10"
        row["filepath"] = str(folder / row["filepath"])
        if label is not None and i == num_rows - 1:
            row["label"] = label
    shutil.copy(sample_data / "cifar10" / "classnames.txt", tmp_path / "classnames.txt")
    return write_table(tmp_path / "labels.csv", rows, ["filepath", "label"])


def _flickr_pairs(tmp_path: Path, sample_data: Path, *, num_images: int, num_missing: int) -> Path:
    """Write a caption CSV of ``num_images`` Flickr8k test images (5 captions each), the first ones missing."""
    rows = read_rows(sample_data / "flickr8k" / "test.csv")[:5 * num_images]
    for i, row in enumerate(rows):
        folder = tmp_path / "missing" if i // 5 < num_missing else sample_data / "flickr8k"
        row["filepath"] = str(folder / row["filepath"])
    return write_table(tmp_path / "pairs.csv", rows, ["filepath", "caption"])


def _karpathy(tmp_path: Path, sample_data: Path, num_images: int) -> list[dict]:
    by_image: dict[str, list[str]] = {}
    for row in read_rows(sample_data / "flickr8k" / "test.csv"):
        by_image.setdefault(row["filepath"], []).append(row["caption"])
    return [{"filename": Path(file).name, "filepath": "images", "split": "test",
             "sentences": [{"raw": c} for c in captions]} for file, captions in list(by_image.items())[:num_images]]


def _write_karpathy(tmp_path: Path, images: list[dict]) -> Path:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


# Unreadable images


def test_zeroshot_too_many_unreadable(tmp_path, sample_data, encoder, transform):
    table = _cifar_labels(tmp_path, sample_data, num_rows=30, num_missing=28)
    with pytest.raises(ValueError) as caught:
        run_zeroshot(encoder, "cifar10", table, transform=transform)
    message = str(caught.value)
    assert "zero-shot cifar10" in message
    assert "28 of 30 images are unreadable" in message
    assert "eval.max_bad_fraction=0.05" in message
    assert str(tmp_path / "missing") in message


def test_zeroshot_counts_and_names_skipped(tmp_path, sample_data, encoder, transform, caplog):
    table = _cifar_labels(tmp_path, sample_data, num_rows=30, num_missing=1)
    with caplog.at_level(logging.WARNING):
        metrics = run_zeroshot(encoder, "cifar10", table, transform=transform)
    assert metrics["num_images"] == 29
    assert metrics["num_images_skipped"] == 1
    assert "1 of 30 images are unreadable" in caplog.text
    assert str(tmp_path / "missing") in caplog.text


def test_evaluate_applies_max_bad_fraction(tmp_path, sample_data, encoder):
    table = _cifar_labels(tmp_path, sample_data, num_rows=30, num_missing=3)
    strict = EvalConfig(zeroshot={"cifar10": str(table)}, batch_size=64)
    with pytest.raises(ValueError, match="3 of 30 images are unreadable"):
        evaluate(encoder, strict, model_name="tiny")
    lenient = EvalConfig(zeroshot={"cifar10": str(table)}, batch_size=64, max_bad_fraction=0.2)
    (record,) = evaluate(encoder, lenient, model_name="tiny")
    assert record["metrics"]["num_images_skipped"] == 3
    assert record["metrics"]["num_images"] == 27


def test_max_bad_fraction_validated():
    with pytest.raises(ConfigError, match="eval.max_bad_fraction"):
        EvalConfig(max_bad_fraction=1.5)
    assert load_config(None, ["eval.max_bad_fraction=0.5"]).eval.max_bad_fraction == 0.5


def test_retrieval_and_gap_unreadable(tmp_path, sample_data, encoder, transform):
    pairs = _flickr_pairs(tmp_path, sample_data, num_images=10, num_missing=2)
    with pytest.raises(ValueError, match="2 of 10 images are unreadable"):
        run_retrieval(encoder, pairs, transform=transform)
    with pytest.raises(ValueError, match="2 of 10 images are unreadable"):
        run_modality_gap(encoder, pairs, transform=transform, plot_path=None)
    metrics = run_retrieval(encoder, pairs, transform=transform, max_bad_fraction=0.25)
    assert metrics["num_images_skipped"] == 2
    assert metrics["num_images"] == 8
    gap = run_modality_gap(encoder, pairs, transform=transform, plot_path=None, max_bad_fraction=0.25)
    assert gap["num_images_skipped"] == 2
    assert gap["num_pairs"] == 8


def test_probe_unreadable(tmp_path, sample_data, encoder, transform):
    rows = read_rows(sample_data / "dtd" / "labels.csv")[:40]
    for i, row in enumerate(rows):
        row["filepath"] = str((tmp_path / "missing" if i % 4 == 0 else sample_data / "dtd") / row["filepath"])
    shutil.copy(sample_data / "dtd" / "classnames.txt", tmp_path / "classnames.txt")
    table = write_table(tmp_path / "labels.csv", rows, ["filepath", "label"])
    common = {"transform": transform, "c_values": [1.0], "val_fraction": 0.2, "test_fraction": 0.5}
    with pytest.raises(ValueError, match="probe dtd .*10 of 40 images are unreadable"):
        run_probe(encoder, "dtd", table, **common)
    metrics = run_probe(encoder, "dtd", table, max_bad_fraction=0.3, **common)
    assert metrics["num_images_skipped"] == 10


def test_karpathy_images_not_found_hint(tmp_path, sample_data, encoder, transform):
    path = _write_karpathy(tmp_path, _karpathy(tmp_path, sample_data, num_images=4))
    with pytest.raises(ValueError) as caught:
        run_retrieval(encoder, path, transform=transform)
    message = str(caught.value)
    assert "none of the 4 images could be read" in message
    assert str(tmp_path / "images" / _karpathy(tmp_path, sample_data, 1)[0]["filename"]) in message
    assert "--retrieval-images" in message


# Templates


@pytest.mark.parametrize(("template", "reason"), [
    ("a {c} in {place}", "unknown placeholder {place}"),
    ("a {c} :-{", "Single '{'"),
    ("a {c} number {0}", "Replacement index 0"),
    ("no placeholder here", "no class placeholder"),
])
def test_invalid_template_names_file_and_line(tmp_path, template, reason):
    path = tmp_path / "templates.txt"
    path.write_text(f"a photo of a {{c}}.\n\n{template}\n")
    with pytest.raises(ValueError) as caught:
        resolve_prompts("cifar10", templates_file=path)
    message = str(caught.value)
    assert f"{path}, line 3" in message
    assert repr(template) in message
    assert reason in message
    assert "--templates" in message


def test_missing_template_file_names_option(tmp_path, sample_data, no_encoding):
    cfg = EvalConfig(zeroshot={"dtd": str(sample_data / "dtd" / "labels.csv")},
                     templates=str(tmp_path / "absent.txt"))
    with pytest.raises(FileNotFoundError, match=r"--templates \(eval.templates\) '.*absent.txt'"):
        evaluate(no_encoding, cfg, model_name="tiny")


# Karpathy JSON entries


@pytest.mark.parametrize("key", ["sentences", "filename"])
def test_karpathy_entry_missing_key(tmp_path, sample_data, transform, key):
    images = _karpathy(tmp_path, sample_data, num_images=3)
    name = images[1]["filename"]
    del images[1][key]
    path = _write_karpathy(tmp_path, images)
    with pytest.raises(ValueError) as caught:
        open_captions(path, transform=transform)
    message = str(caught.value)
    assert str(path) in message
    assert f"no {key!r} key" in message
    if key == "sentences":
        assert repr(name) in message
    else:
        assert "image 1 of split 'test'" in message


def test_karpathy_image_without_captions(tmp_path, sample_data, encoder, transform, caplog):
    images = _karpathy(tmp_path, sample_data, num_images=6)
    images[2]["sentences"] = []
    path = _write_karpathy(tmp_path, images)
    with caplog.at_level(logging.WARNING):
        metrics = run_retrieval(encoder, path, transform=transform, image_root=str(sample_data / "flickr8k"))
    assert "1 of 6 images of split 'test' have no captions" in caplog.text
    assert images[2]["filename"] in caplog.text
    assert metrics["num_images"] == 5
    assert metrics["num_texts"] == 25
    assert metrics["num_images_without_captions"] == 1
    assert metrics["num_images_skipped"] == 0


# Labels and dataset names


def test_negative_label_reported_before_encoding(tmp_path, sample_data, no_encoding, transform):
    table = _cifar_labels(tmp_path, sample_data, num_rows=10, num_missing=0, label="-1")
    with pytest.raises(ValueError) as caught:
        run_zeroshot(no_encoding, "cifar10", table, transform=transform)
    message = str(caught.value)
    assert "label -1 of 1 images" in message
    assert "outside the 10 class names" in message
    assert "label 0 " not in message


def test_duplicate_dataset_options(tmp_path):
    def args(**given):
        import argparse

        values = {"zeroshot": [], "retrieval": None, "retrieval_split": "test", "retrieval_images": None,
                  "probe": [], "modality_gap": None, "templates": None, "bundled_eval": False}
        values.update(given)
        return argparse.Namespace(**values)

    with pytest.raises(ConfigError, match="'cifar10=A.csv' and --zeroshot 'cifar10=B.csv'"):
        eval_config_from_args(args(zeroshot=["cifar10=A.csv", "cifar10=B.csv"]), batch_size=8)
    with pytest.raises(ConfigError, match="'cifar10=A.csv' and --zeroshot 'cifar-10=B.csv'"):
        eval_config_from_args(args(zeroshot=["cifar10=A.csv", "cifar-10=B.csv"]), batch_size=8)
    with pytest.raises(ConfigError, match="'my set=A.csv' and --probe 'my_set=B.csv'"):
        eval_config_from_args(args(probe=["my set=A.csv", "my_set=B.csv"]), batch_size=8)
    cfg, _ = eval_config_from_args(args(zeroshot=["cifar10=A.csv"], probe=["cifar10=A.csv"]), batch_size=8)
    assert cfg.zeroshot == cfg.probe == {"cifar10": "A.csv"}


@pytest.mark.parametrize("task", ["zeroshot", "probe"])
def test_evaluate_rejects_clashing_names(sample_data, no_encoding, task):
    labels = str(sample_data / "dtd" / "labels.csv")
    cfg = EvalConfig(**{task: {"cifar10": labels, "CIFAR-10": labels}})
    with pytest.raises(ValueError, match=f"eval.{task} names 'cifar10' and 'CIFAR-10'"):
        evaluate(no_encoding, cfg, model_name="tiny")
