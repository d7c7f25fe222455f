"""Run evaluation tasks on a model and collect CLIP_benchmark-style records.

Each record is ``{"dataset": ..., "model": ..., "task": "zeroshot_classification" | "zeroshot_retrieval",
"metrics": {...}}``, the shape CLIP_benchmark writes, so existing result tooling reads our JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import EvalConfig
from ..data.csv_dataset import BadSample, LabelledImageDataset, collate_samples, read_table
from ..data.images import ImageDecodeError, load_image
from ..data.loader import build_eval_loader
from ..data.transforms import PairedViews
from .features import Encoder
from .prompts import resolve_prompts
from .retrieval import retrieval_metrics
from .zeroshot import zeroshot_classify

__all__ = ["CaptionedImages", "eval_views", "evaluate", "run_retrieval", "run_zeroshot"]

logger = logging.getLogger(__name__)


def eval_views(model) -> PairedViews:
    """Evaluation transform for ``model``: centre crops for the trunk and, when needed, the teacher view."""
    geometry = getattr(model, "geometry", None)
    spec = model.spec
    return PairedViews(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std,
                       teacher_size=geometry.image_size if geometry is not None else None, train=False)


class CaptionedImages(Dataset):
    """The distinct images of a caption table, with every caption mapped to its image.

    Attributes:
        files: distinct image paths in first-seen order.
        texts: every caption, in table order.
        text_to_image: [T] index into ``files`` for each caption.
    """

    def __init__(self, path: str | Path, *, transform, filepath_column: str = "filepath",
                 caption_column: str = "caption", separator: str | None = None) -> None:
        path = Path(path)
        rows = read_table(path, [filepath_column, caption_column], separator=separator)
        position: dict[str, int] = {}
        self.files: list[str] = []
        self.texts: list[str] = []
        owners: list[int] = []
        for row in rows:
            file = str(path.parent / row[filepath_column])
            if file not in position:
                position[file] = len(self.files)
                self.files.append(file)
            self.texts.append(row[caption_column] or "")
            owners.append(position[file])
        self.text_to_image = torch.tensor(owners)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        try:
            image = load_image(self.files[index])
        except ImageDecodeError as err:
            return BadSample(index=index, source=self.files[index], reason=str(err))
        sample = self.transform(image)
        sample["index"] = index
        return sample


def run_zeroshot(encoder: Encoder, name: str, labels_csv: str | Path, *, transform, batch_size: int = 256,
                 num_workers: int = 0, templates_file: str | None = None, prompts_json: str | None = None,
                 ) -> dict[str, Any]:
    """Zero-shot classification on a ``filepath,label`` table; ``classnames.txt`` beside it names the labels."""
    labels_csv = Path(labels_csv)
    prompts = resolve_prompts(name, classnames_file=labels_csv.parent / "classnames.txt",
                              templates_file=templates_file, prompts_json=prompts_json)
    dataset = LabelledImageDataset(labels_csv, transform=transform)
    loader = build_eval_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    return zeroshot_classify(encoder, loader, prompts, name=name, batch_size=batch_size)


def run_retrieval(encoder: Encoder, captions_csv: str | Path, *, transform, batch_size: int = 256,
                  num_workers: int = 0) -> dict[str, Any]:
    """Retrieval on a ``filepath,caption`` table with one or more captions per image."""
    dataset = CaptionedImages(captions_csv, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_samples)
    feats = encoder.images(loader, desc="retrieval")
    # Captions of unreadable images are dropped and image indices renumbered to the embedded rows.
    kept = feats["index"]
    remap = torch.full((len(dataset),), -1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    owners = remap[dataset.text_to_image]
    keep_text = (owners >= 0).tolist()
    texts = [text for text, keep in zip(dataset.texts, keep_text, strict=True) if keep]
    text_to_image = owners[owners >= 0]
    text_features = encoder.texts(texts, batch_size=batch_size)
    result = retrieval_metrics(feats["image_features"], text_features, text_to_image)
    result["source"] = str(captions_csv)
    return result


def evaluate(encoder: Encoder, cfg: EvalConfig, *, model_name: str, num_workers: int = 0) -> list[dict[str, Any]]:
    """Run every task named in ``cfg`` and return CLIP_benchmark-style records."""
    transform = eval_views(encoder.model)
    records = []
    for name, labels_csv in cfg.zeroshot.items():
        metrics = run_zeroshot(encoder, name, labels_csv, transform=transform, batch_size=cfg.batch_size,
                               num_workers=num_workers, templates_file=cfg.templates, prompts_json=cfg.prompts)
        logger.info("Zero-shot %s: top-1 %.3f (chance %.3f), top-5 %.3f", name, metrics["top1"],
                    metrics["chance_top1"], metrics["top5"])
        records.append({"dataset": name, "model": model_name, "task": "zeroshot_classification", "metrics": metrics})
    if cfg.retrieval:
        metrics = run_retrieval(encoder, cfg.retrieval, transform=transform, batch_size=cfg.batch_size,
                                num_workers=num_workers)
        logger.info("Retrieval: image->text R@5 %.3f, text->image R@5 %.3f", metrics["image_to_text"]["R@5"],
                    metrics["text_to_image"]["R@5"])
        records.append({"dataset": Path(cfg.retrieval).stem, "model": model_name, "task": "zeroshot_retrieval",
                        "metrics": metrics})
    return records
