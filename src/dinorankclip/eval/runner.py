"""Run evaluation tasks on a model and collect CLIP_benchmark-style records.

Each record is ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, the shape
CLIP_benchmark writes, so existing result tooling reads our JSON. Tasks: ``zeroshot_classification``,
``zeroshot_retrieval``, ``linear_probe`` and ``modality_gap``. A dataset that could not be evaluated
because it is not available gets a record with empty metrics and a ``skipped`` reason.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig
from ..data.csv_dataset import collate_samples
from ..data.loader import build_eval_loader
from ..data.transforms import PairedViews
from .captions import CaptionedImages, open_captions
from .datasets import canonical_name, open_labelled
from .features import Encoder, check_unreadable
from .modality_gap import run_modality_gap
from .probe import run_probe
from .prompts import read_templates, resolve_prompts
from .retrieval import retrieval_metrics
from .zeroshot import check_label_range, zeroshot_classify

__all__ = [
    "TASKS",
    "CaptionedImages",
    "build_encoder",
    "check_dataset_names",
    "eval_views",
    "evaluate",
    "record_filename",
    "run_retrieval",
    "run_zeroshot",
]

logger = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "probe", "modality_gap")
TASK_NAMES = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "probe": "linear_probe",
              "modality_gap": "modality_gap"}


def build_encoder(checkpoint: str | Path, device: torch.device, *, teacher_weights: str | None = None):
    """Load a checkpoint for evaluation.

    The teacher is built only when the model injects teacher tokens directly
    (``fusion.injection_source=teacher``); a student-injection model runs without it.

    Args:
        checkpoint: run folder or ``model.safetensors``.
        device: where to run.
        teacher_weights: teacher weights to use instead of the ``teacher.weights`` path saved in the checkpoint's
            config (for weights that moved since training).

    Returns:
        (encoder, config) of the checkpoint.
    """
    from ..models.trunk import build_tokenizer
    from ..train.checkpoint import load_model

    model, cfg = load_model(checkpoint, map_location=device)
    teacher = None
    if cfg.fusion.enabled and cfg.fusion.injection_source == "teacher":
        from ..train.teacher_source import OnlineTeacher

        if teacher_weights is not None:
            cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, weights=teacher_weights))
        # Training seeds torch with train.seed right before it builds the teacher, so random weights
        # (teacher.weights=random) come out the same here as in training.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            teacher = OnlineTeacher(cfg, device)
    elif teacher_weights is not None:
        logger.warning("--teacher-weights is unused: this model injects through its student and needs no teacher")
    return Encoder(model, build_tokenizer(model.spec), device, teacher), cfg


def eval_views(model) -> PairedViews:
    """Evaluation transform for ``model``: centre crops for the trunk and, when needed, the teacher view."""
    geometry = getattr(model, "geometry", None)
    spec = model.spec
    return PairedViews(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std,
                       teacher_size=geometry.image_size if geometry is not None else None, train=False)


def run_zeroshot(encoder: Encoder, name: str, source: str | Path, *, transform, batch_size: int = 256,
                 num_workers: int = 0, templates_file: str | None = None, prompts_json: str | None = None,
                 split: str = "test", max_bad_fraction: float = 0.05) -> dict[str, Any]:
    """Zero-shot classification on a labels CSV or a dataset folder (see :func:`~.datasets.open_labelled`).

    Labels of a labels table are checked against the class names before any image is encoded; other
    layouts are checked after encoding.
    """
    labelled = open_labelled(name, source, split=split, transform=transform)
    names_file = Path(source).parent / "classnames.txt" if Path(source).is_file() else None
    prompts = resolve_prompts(labelled.name, classnames=labelled.classnames,
                              classnames_source=labelled.classnames_source, classnames_file=names_file,
                              templates_file=templates_file, prompts_json=prompts_json,
                              dataset_templates_file=labelled.templates_file)
    known_labels = getattr(labelled.dataset, "labels", None)
    if known_labels is not None:
        check_label_range(known_labels, len(prompts.classnames), name=name, source=str(source))
    workers = 0 if isinstance(labelled.dataset, torch.utils.data.IterableDataset) else num_workers
    loader = build_eval_loader(labelled.dataset, batch_size=batch_size, num_workers=workers)
    metrics = zeroshot_classify(encoder, loader, prompts, name=name, batch_size=batch_size,
                                max_bad_fraction=max_bad_fraction, source=str(source))
    metrics.update(acc1=metrics["top1"], acc5=metrics["top5"], layout=labelled.layout, source=str(source),
                   split=split if labelled.layout != "image_folder" else None)
    return metrics


def run_retrieval(encoder: Encoder, source: str | Path, *, transform, batch_size: int = 256,
                  num_workers: int = 0, split: str = "test", image_root: str | None = None,
                  max_bad_fraction: float = 0.05) -> dict[str, Any]:
    """Retrieval on a caption CSV or one split of a Karpathy JSON, with one or more captions per image.

    Raises:
        ValueError: more than ``max_bad_fraction`` of the images are unreadable; the message shows a path
            that was tried and the option that sets the image folder.
    """
    dataset = open_captions(source, split=split, image_root=image_root, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_samples)
    feats = encoder.images(loader, desc="retrieval")
    check_unreadable(feats, desc=f"retrieval on {source}", max_bad_fraction=max_bad_fraction,
                     hint=dataset.path_hint())
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
    for k, value in result["text_to_image"].items():
        result[f"image_retrieval_recall@{k[2:]}"] = value
    for k, value in result["image_to_text"].items():
        result[f"text_retrieval_recall@{k[2:]}"] = value
    result.update(source=str(source), split=dataset.split, num_images_skipped=feats["num_images_skipped"],
                  num_images_without_captions=dataset.num_images_without_captions)
    return result


def _record(dataset: str, task: str, metrics: dict[str, Any], model_name: str, pretrained: str,
            skipped: str | None = None) -> dict[str, Any]:
    record = {"dataset": dataset, "model": model_name, "pretrained": pretrained, "task": TASK_NAMES[task],
              "metrics": metrics, "language": "en"}
    if skipped is not None:
        record["skipped"] = skipped
    return record


def record_filename(record: dict[str, Any]) -> str:
    """File name for one record: ``<task>__<dataset>.json`` with unsafe characters replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{record['task']}__{record['dataset']}")
    return f"{safe}.json"


def check_dataset_names(names: Iterable[str], *, task: str, option: str) -> None:
    """Raise when two dataset names of one task give the same dataset or the same record file.

    ``cifar10`` and ``cifar-10`` are one dataset (see :data:`~.datasets.CANONICAL_NAMES`), and ``my set``
    and ``my_set`` would both be written to ``<task>__my_set.json``.

    Raises:
        ValueError: naming both names, the file they share and ``option``.
    """
    seen: dict[str, str] = {}
    for name in names:
        file = record_filename({"task": TASK_NAMES[task], "dataset": canonical_name(name)})
        if file in seen:
            raise ValueError(
                f"{option} names {seen[file]!r} and {name!r} both give the dataset {canonical_name(name)!r} "
                f"(record file {file}), so one result would replace the other; give each dataset once, "
                "under distinct names"
            )
        seen[file] = name


def evaluate(encoder: Encoder, cfg: EvalConfig, *, model_name: str, num_workers: int = 0,
             tasks: Iterable[str] | None = None, skipped: dict[tuple[str, str], str] | None = None,
             plot_dir: str | Path | None = None, pretrained: str = "") -> list[dict[str, Any]]:
    """Run the tasks named in ``cfg`` and return CLIP_benchmark-style records.

    Args:
        encoder: the model to evaluate.
        cfg: datasets and settings of every task.
        model_name: the ``model`` field of each record.
        num_workers: data loader processes.
        tasks: subset of :data:`TASKS` to run; None runs every task that ``cfg`` gives data for.
        skipped: ``{(task, dataset): reason}`` for datasets that are not available; each gets a record
            with empty metrics and the reason.
        plot_dir: where the modality-gap plot is written; None writes no plot.
        pretrained: the ``pretrained`` field of each record (the checkpoint path).

    Raises:
        ValueError: an unknown task name, or two names of one task for the same dataset (checked before
            any work).
    """
    chosen = set(TASKS if tasks is None else tasks)
    unknown = chosen - set(TASKS)
    if unknown:
        raise ValueError(f"unknown evaluation task {sorted(unknown)[0]!r}; allowed tasks: {', '.join(TASKS)}")
    if "zeroshot" in chosen:
        check_dataset_names(cfg.zeroshot, task="zeroshot", option="eval.zeroshot")
        if cfg.zeroshot and cfg.templates:
            read_templates(cfg.templates, option="--templates (eval.templates)")  # fail before any encoding
    if "probe" in chosen:
        check_dataset_names(cfg.probe, task="probe", option="eval.probe")
    transform = eval_views(encoder.model)
    records = []
    common = {"transform": transform, "batch_size": cfg.batch_size, "num_workers": num_workers,
              "max_bad_fraction": cfg.max_bad_fraction}

    if "zeroshot" in chosen:
        for name, source in cfg.zeroshot.items():
            metrics = run_zeroshot(encoder, name, source, templates_file=cfg.templates, prompts_json=cfg.prompts,
                                   split=cfg.zeroshot_split, **common)
            logger.info("Zero-shot %s: top-1 %.3f (chance %.3f), top-5 %.3f", name, metrics["top1"],
                        metrics["chance_top1"], metrics["top5"])
            records.append(_record(canonical_name(name), "zeroshot", metrics, model_name, pretrained))

    if "retrieval" in chosen and cfg.retrieval:
        metrics = run_retrieval(encoder, cfg.retrieval, split=cfg.retrieval_split,
                                image_root=cfg.retrieval_image_root, **common)
        logger.info("Retrieval: image->text R@5 %.3f, text->image R@5 %.3f", metrics["image_to_text"]["R@5"],
                    metrics["text_to_image"]["R@5"])
        records.append(_record(Path(cfg.retrieval).stem, "retrieval", metrics, model_name, pretrained))

    if "probe" in chosen:
        for name, source in cfg.probe.items():
            metrics = run_probe(encoder, name, source, c_values=cfg.probe_c_values,
                                val_fraction=cfg.probe_val_fraction, test_fraction=cfg.probe_test_fraction,
                                max_iter=cfg.probe_max_iter, feature_key=cfg.probe_features, **common)
            logger.info("Linear probe %s: top-1 %.3f (chance %.3f), C=%g", name, metrics["top1"],
                        metrics["chance_top1"], metrics["best_c"])
            records.append(_record(canonical_name(name), "probe", metrics, model_name, pretrained))

    if "modality_gap" in chosen and cfg.modality_gap:
        dataset = Path(cfg.modality_gap).stem
        plot = Path(plot_dir) / f"modality_gap__{dataset}.png" if plot_dir is not None else None
        metrics = run_modality_gap(encoder, cfg.modality_gap, plot_path=plot, split=cfg.retrieval_split,
                                   image_root=cfg.retrieval_image_root, max_pairs=cfg.modality_gap_max_pairs,
                                   title=f"{model_name}: modality gap on {dataset}", **common)
        logger.info("Modality gap %s: |c(clip_image) - c(clip_text)| = %.3f", dataset,
                    metrics["gaps"]["clip_image|clip_text"])
        records.append(_record(dataset, "modality_gap", metrics, model_name, pretrained))

    for (task, name), reason in (skipped or {}).items():
        if task in chosen:
            logger.warning("%s %s skipped: %s", TASK_NAMES[task], name, reason)
            records.append(_record(canonical_name(name), task, {}, model_name, pretrained, skipped=reason))
    return records
