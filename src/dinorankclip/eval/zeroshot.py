"""Zero-shot classification with a prompt-ensemble classifier built per class index."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .features import Encoder, check_unreadable
from .prompts import PromptSet

__all__ = ["build_classifier", "check_label_range", "classification_metrics", "zeroshot_classify"]

logger = logging.getLogger(__name__)


def build_classifier(encoder: Encoder, prompts: PromptSet, *, batch_size: int = 256) -> torch.Tensor:
    """Embed every template for every class and average per class index.

    Returns:
        [C, E] unit-norm class embeddings; row c belongs to label c, also when two labels share a name.
    """
    texts = [p for label in range(len(prompts.classnames)) for p in prompts.prompts_for(label)]
    embeddings = encoder.texts(texts, batch_size=batch_size)  # [C * T, E]
    per_class = embeddings.view(len(prompts.classnames), len(prompts.templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Top-1, top-5, mean per-class recall and the chance levels of a uniform random guess.

    Args:
        logits: [n, C] scores.
        labels: [n] integer labels in [0, C).
        num_classes: C (all classes of the classifier, including those without test images).
    """
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices  # [n, k]
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=-1)
    present = labels.unique()
    recalls = torch.stack([hit1[labels == c].float().mean() for c in present])
    return {
        "top1": hit1.float().mean().item(),
        "top5": hit5.float().mean().item(),
        "mean_per_class_recall": recalls.mean().item(),
        "chance_top1": 1.0 / num_classes,
        "chance_top5": k / num_classes,
        "num_images": int(labels.numel()),
        "num_classes": num_classes,
        "num_classes_with_images": int(present.numel()),
    }


def check_label_range(labels, num_classes: int, *, name: str, source: str = "") -> None:
    """Raise when a label lies outside ``[0, num_classes)``.

    Raises:
        ValueError: naming the offending labels (up to five), how many images carry them and the source.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    outside = (labels < 0) | (labels >= num_classes)
    if not bool(outside.any()):
        return
    bad = sorted(set(labels[outside].tolist()))
    shown = ", ".join(str(label) for label in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    where = f" in {source}" if source else ""
    raise ValueError(
        f"{name}: label{'s' if len(bad) > 1 else ''} {shown} of {int(outside.sum())} images{where} "
        f"{'are' if len(bad) > 1 else 'is'} outside the {num_classes} class names (valid labels: 0 to "
        f"{num_classes - 1}); fix the labels, or the classnames.txt that goes with the labels file"
    )


def zeroshot_classify(encoder: Encoder, loader, prompts: PromptSet, *, name: str = "zeroshot",
                      batch_size: int = 256, max_bad_fraction: float = 0.05, source: str = "") -> dict[str, Any]:
    """Classify every image of ``loader`` (batches with ``label``) against the prompt classifier.

    Args:
        max_bad_fraction: largest tolerated share of unreadable images.
        source: the dataset's file or folder, for error messages.

    Returns:
        The metrics of :func:`classification_metrics`, ``num_images_skipped`` and where the class names and
        templates came from.

    Raises:
        ValueError: more than ``max_bad_fraction`` of the images are unreadable, or a label has no class name.
    """
    classifier = build_classifier(encoder, prompts, batch_size=batch_size)  # [C, E]
    feats = encoder.images(loader, desc=name)
    check_unreadable(feats, desc=f"zero-shot {name}" + (f" ({source})" if source else ""),
                     max_bad_fraction=max_bad_fraction)
    labels = feats["label"]
    check_label_range(labels, len(prompts.classnames), name=name, source=source)
    logits = feats["image_features"] @ classifier.T
    metrics = classification_metrics(logits, labels, len(prompts.classnames))
    if metrics["num_classes_with_images"] * 2 < metrics["num_classes"]:
        logger.warning("%s: only %d of %d classes have images; the chance level assumes all %d classes, so check "
                       "the dataset's folders or labels", name, metrics["num_classes_with_images"],
                       metrics["num_classes"], metrics["num_classes"])
    metrics.update(num_images_skipped=feats["num_images_skipped"], templates=prompts.template_source,
                   template_origin=prompts.template_origin,
                   num_templates=len(prompts.templates), classnames=prompts.classnames_source,
                   duplicate_classnames=prompts.duplicate_names())
    return metrics
