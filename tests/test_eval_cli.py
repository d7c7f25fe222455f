"""``dinorankclip eval``: a subset of tasks, one JSON per record, and the bundled-data defaults."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from dinorankclip.cli.eval_cmd import eval_config_from_args
from dinorankclip.cli.main import main
from dinorankclip.config import ConfigError, load_config
from dinorankclip.train.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_overrides, sample_data):
    out = tmp_path_factory.mktemp("eval_cli_run")
    cfg = load_config(None, list(tiny_overrides) + [f"data.train={sample_data / 'flickr8k' / 'train.csv'}",
                                                    f"train.output_dir={out}", "train.steps=1"])
    train(cfg)
    return out


def _dataset_args(**given) -> argparse.Namespace:
    args = {"zeroshot": [], "retrieval": None, "retrieval_split": "test", "retrieval_images": None, "probe": [],
            "modality_gap": None, "templates": None, "bundled_eval": False}
    args.update(given)
    return argparse.Namespace(**args)


def test_eval_task_subset_writes_records(tmp_path, run_dir, sample_data, capsys):
    rows = list(csv.DictReader((sample_data / "flickr8k" / "test.csv").open(newline="")))[:15]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "caption"])
        writer.writeheader()
        writer.writerows({"filepath": str(sample_data / "flickr8k" / r["filepath"]), "caption": r["caption"]}
                         for r in rows)
    out = tmp_path / "results"
    code = main(["eval", "--checkpoint", str(run_dir), "--workers", "0", "--tasks", "zeroshot,modality_gap",
                 "--zeroshot", f"dtd={sample_data / 'dtd' / 'labels.csv'}", "--retrieval", str(pairs),
                 "--modality-gap", str(pairs), "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in printed] == ["zeroshot_classification", "modality_gap"]
    assert json.loads((out / "all.json").read_text()) == printed
    zeroshot = json.loads((out / "zeroshot_classification__dtd.json").read_text())
    assert zeroshot["model"] == run_dir.name
    assert zeroshot["pretrained"] == str(run_dir)
    assert zeroshot["metrics"]["num_images"] == 100
    gap = json.loads((out / "modality_gap__pairs.json").read_text())
    assert gap["metrics"]["num_pairs"] == 3
    assert (out / "modality_gap__pairs.png").is_file()


def test_eval_rejects_unknown_task(run_dir):
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", "zeroshot,linear", "--bundled-eval"]) == 2


def test_eval_without_data_for_tasks(run_dir, sample_data):
    code = main(["eval", "--checkpoint", str(run_dir), "--tasks", "probe",
                 "--retrieval", str(sample_data / "flickr8k" / "test.csv")])
    assert code == 2


def test_bundled_eval_fills_missing_tasks(sample_data):
    cfg, skipped = eval_config_from_args(_dataset_args(bundled_eval=True, retrieval="mine.csv"), batch_size=32)
    assert cfg.retrieval == "mine.csv"
    assert cfg.modality_gap == str(sample_data / "flickr8k" / "test.csv")
    assert set(cfg.zeroshot) == {"cifar10", "gtsrb", "flowers102", "dtd", "cub200"}
    assert set(cfg.probe) == {"cub200", "flowers102", "dtd"}
    assert set(skipped) == {("probe", "fgvc_aircraft"), ("probe", "stanford_cars")}
    assert "--probe fgvc_aircraft=ROOT" in skipped[("probe", "fgvc_aircraft")]
    own_probe, own_skipped = eval_config_from_args(
        _dataset_args(bundled_eval=True, probe=["cars=/data/cars"]), batch_size=32)
    assert own_probe.probe == {"cars": "/data/cars"}
    assert own_skipped == {}
    with pytest.raises(ConfigError, match="NAME=SOURCE"):
        eval_config_from_args(_dataset_args(zeroshot=["cifar10"]), batch_size=32)


@pytest.mark.parametrize(("spec", "missing"), [("=x.csv", "dataset name"), ("cifar10=", "source")])
def test_zeroshot_spec_needs_name_and_source(run_dir, capsys, spec, missing):
    assert main(["eval", "--checkpoint", str(run_dir), "--zeroshot", spec]) == 2
    assert f"lacks a {missing}" in capsys.readouterr().err


def test_eval_max_bad_fraction_option(tmp_path, run_dir, sample_data, capsys):
    rows = list(csv.DictReader((sample_data / "cifar10" / "test.csv").open(newline="")))[:30]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label"])
        for i, row in enumerate(rows):
            folder = tmp_path / "missing" if i < 28 else sample_data / "cifar10"
            writer.writerow([str(folder / row["filepath"]), row["label"]])
    (tmp_path / "classnames.txt").write_text((sample_data / "cifar10" / "classnames.txt").read_text())
    args = ["eval", "--checkpoint", str(run_dir), "--workers", "0", "--zeroshot", f"cifar10={table}"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "28 of 30 images are unreadable" in error
    assert "--max-bad-fraction" in error
    assert main(args + ["--max-bad-fraction", "1"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["metrics"]["num_images_skipped"] == 28
    assert record["metrics"]["num_images"] == 2
    assert main(args + ["--max-bad-fraction", "2"]) == 2
    assert "eval.max_bad_fraction=2.0 is invalid" in capsys.readouterr().err
