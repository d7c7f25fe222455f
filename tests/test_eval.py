"""Evaluation: retrieval recall and chance levels, zero-shot classifier rows and template precedence."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.config import EvalConfig
from dinorankclip.eval.prompts import resolve_prompts
from dinorankclip.eval.retrieval import recall_at_k, retrieval_chance
from dinorankclip.eval.runner import evaluate
from dinorankclip.eval.zeroshot import build_classifier, classification_metrics


def test_retrieval_hit_on_any_caption():
    images = torch.eye(3)
    # Image 0 owns texts 0 and 1; text 1 matches image 0 exactly, text 0 points elsewhere.
    texts = F.normalize(torch.tensor([[0.0, 1.0, 0.1], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 0, 1, 2])
    result = recall_at_k(images, texts, owner, ks=(1, 2))
    assert result["image_to_text"]["R@1"] == pytest.approx(1.0)
    # Text 0 ranks image 1 first and its own image 0 last: a miss at K=1 and K=2.
    assert result["text_to_image"]["R@1"] == pytest.approx(3 / 4)
    assert result["text_to_image"]["R@2"] == pytest.approx(3 / 4)


def test_retrieval_chance_exact():
    counts = [2, 1, 3]
    chance = retrieval_chance(counts, ks=(1, 2))
    total = 6
    expected = sum(1 - math.comb(total - c, 2) / math.comb(total, 2) for c in counts) / 3
    assert chance["image_to_text"]["R@2"] == pytest.approx(expected)
    assert chance["image_to_text"]["R@1"] == pytest.approx(sum(c / total for c in counts) / 3)
    assert chance["text_to_image"]["R@2"] == pytest.approx(2 / 3)


def test_classification_metrics_known_answer():
    logits = torch.tensor([[3.0, 2, 1, 0], [0, 3, 2, 1], [3, 0, 2, 1]])
    labels = torch.tensor([0, 2, 2])
    metrics = classification_metrics(logits, labels, 4)
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["top5"] == pytest.approx(1.0)
    assert metrics["mean_per_class_recall"] == pytest.approx(0.5)
    assert metrics["chance_top1"] == pytest.approx(0.25)


def test_duplicate_class_names_stay_separate(tmp_path, encoder, caplog):
    (tmp_path / "classnames.txt").write_text("cat\ncat\ndog\n")
    prompts = resolve_prompts("mysets", classnames_file=tmp_path / "classnames.txt")
    assert "shared by labels [0, 1]" in caplog.text
    classifier = build_classifier(encoder, prompts)
    assert classifier.shape[0] == 3
    torch.testing.assert_close(classifier[0], classifier[1])


def test_template_precedence(tmp_path):
    user = tmp_path / "templates.txt"
    user.write_text("a drawing of a {c}.\nart of the {}.\n")
    assert resolve_prompts("cifar10", templates_file=user).template_source == "user"
    assert resolve_prompts("cifar10", templates_file=user).templates[1] == "art of the {c}."
    own = resolve_prompts("cifar10")
    assert own.template_source == "dataset" and len(own.templates) == 18
    names = tmp_path / "classnames.txt"
    names.write_text("a\nb\n")
    builtin = resolve_prompts("cub200", classnames_file=names)
    assert builtin.template_source == "builtin"
    assert builtin.templates == ["a photo of a {c}, a type of bird."]


def test_unknown_dataset_without_names():
    with pytest.raises(ValueError, match="classnames.txt"):
        resolve_prompts("no_such_set")


def test_evaluate_on_real_csvs(tmp_path, sample_data, encoder):
    # A small copy: 20 CIFAR-10 test images and 4 Flickr8k test images with their 5 captions each.
    src = sample_data / "cifar10"
    lines = (src / "test.csv").read_text().splitlines()
    (tmp_path / "cifar").mkdir()
    shutil.copy(src / "classnames.txt", tmp_path / "cifar" / "classnames.txt")
    rows = [lines[0]] + lines[1::25]
    for row in rows[1:]:
        rel = row.split(",")[0]
        (tmp_path / "cifar" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, tmp_path / "cifar" / rel)
    (tmp_path / "cifar" / "test.csv").write_text("\n".join(rows) + "\n")
    cfg = EvalConfig(zeroshot={"cifar10": str(tmp_path / "cifar" / "test.csv")},
                     retrieval=str(sample_data / "flickr8k" / "test.csv"), batch_size=128)
    records = evaluate(encoder, cfg, model_name="tiny")
    zs = next(r for r in records if r["task"] == "zeroshot_classification")
    assert zs["dataset"] == "cifar10"
    assert zs["metrics"]["num_images"] == 20
    assert zs["metrics"]["templates"] == "dataset"
    assert zs["metrics"]["chance_top1"] == pytest.approx(0.1)
    rt = next(r for r in records if r["task"] == "zeroshot_retrieval")
    assert rt["metrics"]["num_images"] == 125
    assert rt["metrics"]["num_texts"] == 625
    assert 0 <= rt["metrics"]["image_to_text"]["R@10"] <= 1
