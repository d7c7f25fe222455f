"""Linear probe: deterministic splits, the C sweep, and a trained checkpoint beating chance on CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinorankclip.config import load_config
from dinorankclip.eval.probe import fit_probe, per_class_split, probe_sets, run_probe
from dinorankclip.eval.runner import build_encoder, eval_views
from dinorankclip.train.trainer import train


def test_per_class_split_known_answer():
    labels = [0, 0, 1, 1, 1, 1, 2, 0, 1]
    kept, held = per_class_split(labels, 0.5)
    # Class 0 (positions 0, 1, 7) holds out 2 of 3 items, its 1st and 3rd: positions 0 and 7.
    # Class 1 (positions 2, 3, 4, 5, 8) holds out round(2.5) = 2 items, its 2nd and 4th: positions 3 and 5.
    # Class 2 has a single item, which stays in the first part.
    assert held == [0, 3, 5, 7]
    assert kept == [1, 2, 4, 6, 8]
    assert sorted(kept + held) == list(range(len(labels)))


def test_per_class_split_keeps_one_per_class():
    kept, held = per_class_split([3, 3], 0.9)
    assert (kept, held) == ([0], [1])


def test_fit_probe_sweeps_c_on_validation():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    x = np.concatenate([centres[c] + 0.3 * rng.normal(size=(20, 8)) for c in range(3)])
    y = np.repeat(np.arange(3), 20)
    result = fit_probe(x[::2], y[::2], x[1::2], y[1::2], c_values=[0.01, 1.0, 100.0], val_fraction=0.2)
    assert set(result["val_accuracy"]) == {"0.01", "1", "100"}
    assert result["c_selection"] == "validation sweep"
    assert result["num_val"] == 6
    assert result["num_train"] == 24
    assert result["num_test"] == 30
    assert result["top1"] > 0.9


def test_fit_probe_without_validation_uses_default_c():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.9], [0.9, 0.0]])
    y = np.array([0, 1, 0, 1])
    result = fit_probe(x[:2], y[:2], x[2:], y[2:], c_values=[0.1, 10.0], val_fraction=0.2)
    assert result["val_accuracy"] == {}
    assert result["best_c"] == 1.0
    assert result["c_selection"].startswith("default C=1")
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(x[:1], y[:1], x[2:], y[2:], c_values=[1.0], val_fraction=0.2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_overrides, sample_data):
    out = tmp_path_factory.mktemp("probe_run")
    cfg = load_config(None, list(tiny_overrides) + [
        f"data.train={sample_data / 'flickr8k' / 'train.csv'}",
        f"train.output_dir={out}",
        "train.steps=10",
        "train.batch_size=16",
        "train.lr=1e-3",
    ])
    train(cfg)
    return out


def test_probe_beats_chance_on_cifar10(trained_run, sample_data):
    encoder, _ = build_encoder(trained_run, torch.device("cpu"))
    source = f"{sample_data / 'cifar10' / 'train.csv'},{sample_data / 'cifar10' / 'test.csv'}"
    metrics = run_probe(encoder, "cifar10", source, transform=eval_views(encoder.model),
                        c_values=[0.1, 1.0, 10.0, 100.0], val_fraction=0.2, test_fraction=0.5, batch_size=250)
    assert (metrics["num_train"], metrics["num_val"], metrics["num_test"]) == (400, 100, 500)
    assert metrics["chance_top1"] == pytest.approx(0.1)
    # Chance is 0.1; the binomial standard error on 500 test images is 0.013, so 0.2 is a margin of 7 sigma.
    assert metrics["top1"] > 0.2
    assert metrics["split"] == "given train/test sources"
    assert metrics["lp_acc1"] == metrics["top1"]


def test_probe_splits_single_table_per_class(sample_data):
    train, test, how = probe_sets("dtd", sample_data / "dtd" / "labels.csv", transform=None, test_fraction=0.5)
    assert test is None
    assert how == "per class, test fraction 0.5"
    kept, held = per_class_split(train.dataset.labels, 0.5)
    assert len(kept) == len(held) == 50
