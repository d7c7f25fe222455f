"""Linear probe: logistic regression on frozen image features with a regularisation sweep.

Protocol (CLIP's linear probe, with a grid instead of CLIP's search over C):

1. Train and test images come from the dataset's own splits when it has them (torchvision layouts, CUB's
   official flag, CLIP_benchmark WebDataset folders, a CSV with a ``split`` column holding ``train`` and
   ``test``). Otherwise each class is split deterministically: in file order, ``round(n * test_fraction)``
   evenly spaced images of a class with n >= 2 images go to the test set (at least one).
2. A validation split is carved from the training images the same way with ``val_fraction``.
3. For every C in the grid, scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial) is fitted on the
   training images minus the validation images and scored on the validation images. The best C (the
   smallest one on ties) is refitted on all training images and scored on the test set.

When no class has two training images, no validation split exists; the probe then uses C = 1.0 and
records that no sweep took place.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.csv_dataset import read_table
from ..data.loader import build_eval_loader
from .datasets import LabelledSet, open_labelled
from .features import Encoder, check_unreadable

__all__ = ["fit_probe", "per_class_split", "probe_sets", "run_probe"]

logger = logging.getLogger(__name__)

DEFAULT_C = 1.0
# Datasets whose training split for the probe is not called "train".
_TRAIN_SPLIT = {"fgvc_aircraft": "trainval"}
_SPLIT_LAYOUTS = ("torchvision", "cub", "wds")


def _evenly_spaced(n: int, k: int) -> list[int]:
    return [int((j + 0.5) * n / k) for j in range(k)]


def per_class_split(labels: Sequence[int], fraction: float) -> tuple[list[int], list[int]]:
    """Split positions per class: ``round(n * fraction)`` evenly spaced items (at least one) of every class
    with n >= 2 items go to the second part.

    Returns:
        (kept, held_out): positions into ``labels``, each in ascending order.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        by_class[int(label)].append(position)
    held_out: list[int] = []
    for positions in by_class.values():
        n = len(positions)
        if n < 2:
            continue
        k = min(n - 1, max(1, round(n * fraction)))
        held_out.extend(positions[i] for i in _evenly_spaced(n, k))
    held = set(held_out)
    return [p for p in range(len(labels)) if p not in held], sorted(held_out)


def _csv_splits(path: Path) -> set[str]:
    rows = read_table(path, ["filepath", "label"])
    return {row["split"] for row in rows} if "split" in rows[0] else set()


def probe_sets(name: str, source: str | Path, *, transform: Callable,
               test_fraction: float) -> tuple[LabelledSet, LabelledSet | None, str]:
    """Open the training and test data of a probe dataset.

    Args:
        source: a labels CSV, a dataset folder, or ``TRAIN,TEST``: two labels CSVs (or folders) separated
            by a comma.

    Returns:
        (train, test, how): ``test`` is None when the dataset has no own split and ``train`` must be split
        per class; ``how`` describes the split for the result record.
    """
    if "," in str(source):
        train_source, test_source = (part.strip() for part in str(source).split(",", 1))
        return (open_labelled(name, train_source, split=None, transform=transform),
                open_labelled(name, test_source, split=None, transform=transform), "given train/test sources")
    path = Path(source)
    if path.is_file():
        if {"train", "test"} <= _csv_splits(path):
            return (open_labelled(name, path, split="train", transform=transform),
                    open_labelled(name, path, split="test", transform=transform), "csv split column")
        return (open_labelled(name, path, split=None, transform=transform), None,
                f"per class, test fraction {test_fraction}")
    whole = open_labelled(name, path, split="test", transform=transform)
    if whole.layout in _SPLIT_LAYOUTS:
        train_split = _TRAIN_SPLIT.get(whole.name, "train")
        train = open_labelled(name, path, split=train_split, transform=transform)
        return train, whole, f"official {train_split}/test"
    return whole, None, f"per class, test fraction {test_fraction}"


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
              c_values: Sequence[float], val_fraction: float, max_iter: int = 1000) -> dict[str, Any]:
    """Sweep C on a validation split of the training data, refit with the best C, score the test data.

    Args:
        train_x, test_x: [n, D] features.
        train_y, test_y: [n] integer labels.
        c_values: inverse regularisation strengths to try.
        val_fraction: share of each class's training images used for validation.
        max_iter: L-BFGS iterations.

    Returns:
        Top-1/top-5 accuracy, mean per-class recall, the chosen C, validation accuracy per C and counts.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(train_y)) < 2:
        raise ValueError(f"the probe needs training images of at least two classes; got {len(np.unique(train_y))}")

    def fit(x, y, c):
        with warnings.catch_warnings():
            # Few images per class are expected in fine-grained probes; sklearn warns about both.
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)

    fit_idx, val_idx = per_class_split(train_y.tolist(), val_fraction)
    val_accuracy: dict[str, float] = {}
    if val_idx and len(np.unique(train_y[fit_idx])) >= 2:
        for c in c_values:
            model = fit(train_x[fit_idx], train_y[fit_idx], c)
            val_accuracy[f"{c:g}"] = float((model.predict(train_x[val_idx]) == train_y[val_idx]).mean())
        best_c = max(sorted(c_values), key=lambda c: val_accuracy[f"{c:g}"])
        selection = "validation sweep"
    else:
        best_c = DEFAULT_C
        selection = f"default C={DEFAULT_C:g}: no class has two training images, so there is no validation split"

    model = fit(train_x, train_y, best_c)
    probs = model.predict_proba(test_x)  # [n, classes seen in training]
    k = min(5, probs.shape[1])
    topk = model.classes_[np.argsort(-probs, axis=1)[:, :k]]
    hit1 = topk[:, 0] == test_y
    hit5 = (topk == test_y[:, None]).any(axis=1)
    recalls = [hit1[test_y == c].mean() for c in np.unique(test_y)]
    num_classes = len(np.union1d(np.unique(train_y), np.unique(test_y)))
    return {
        "top1": float(hit1.mean()),
        "top5": float(hit5.mean()),
        "mean_per_class_recall": float(np.mean(recalls)),
        "chance_top1": 1.0 / num_classes,
        "best_c": best_c,
        "c_selection": selection,
        "val_accuracy": val_accuracy,
        "num_train": int(len(train_y) - len(val_idx)) if val_accuracy else int(len(train_y)),
        "num_val": int(len(val_idx)) if val_accuracy else 0,
        "num_test": int(len(test_y)),
        "num_classes": num_classes,
        "num_test_classes_unseen": int(len(np.setdiff1d(np.unique(test_y), np.unique(train_y)))),
    }


def _features(encoder: Encoder, labelled: LabelledSet, *, key: str, batch_size: int, num_workers: int,
              max_bad_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Return features [n, D], labels [n] and the number of unreadable images that were skipped."""
    workers = 0 if isinstance(labelled.dataset, torch.utils.data.IterableDataset) else num_workers
    loader = build_eval_loader(labelled.dataset, batch_size=batch_size, num_workers=workers)
    feats = encoder.images(loader, desc=f"probe {labelled.name}", keys=(key,))
    check_unreadable(feats, desc=f"probe {labelled.name} ({labelled.source})", max_bad_fraction=max_bad_fraction)
    if key not in feats:
        raise ValueError(f"probe {labelled.name}: the model has no {key!r} output; set eval.probe_features to "
                         "image_features or clip_image_features")
    return feats[key].numpy(), feats["label"].numpy(), feats["num_images_skipped"]


def run_probe(encoder: Encoder, name: str, source: str | Path, *, transform: Callable,
              c_values: Sequence[float], val_fraction: float, test_fraction: float, max_iter: int = 1000,
              feature_key: str = "image_features", batch_size: int = 256, num_workers: int = 0,
              max_bad_fraction: float = 0.05) -> dict[str, Any]:
    """Linear probe of ``encoder``'s frozen image features on one dataset (see the module docstring).

    Raises:
        ValueError: more than ``max_bad_fraction`` of the training or of the test images are unreadable.
    """
    train, test, how = probe_sets(name, source, transform=transform, test_fraction=test_fraction)
    common = {"key": feature_key, "batch_size": batch_size, "num_workers": num_workers,
              "max_bad_fraction": max_bad_fraction}
    x, y, skipped = _features(encoder, train, **common)
    if test is None:
        train_idx, test_idx = per_class_split(y.tolist(), test_fraction)
        if not test_idx:
            raise ValueError(f"probe {name}: no class has two images, so no test images can be held out")
        train_x, train_y, test_x, test_y = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        train_x, train_y = x, y
        test_x, test_y, test_skipped = _features(encoder, test, **common)
        skipped += test_skipped
    metrics = fit_probe(train_x, train_y, test_x, test_y, c_values=c_values, val_fraction=val_fraction,
                        max_iter=max_iter)
    metrics.update(split=how, features=feature_key, num_images_skipped=skipped, source=str(source), layout=train.layout,
                   lp_acc1=metrics["top1"], lp_acc5=metrics["top5"],
                   lp_mean_per_class_recall=metrics["mean_per_class_recall"])
    if not math.isfinite(metrics["top1"]):
        raise ValueError(f"probe {name}: no test images")
    return metrics
