"""Batched embedding extraction shared by every evaluation task."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["Encoder", "check_unreadable"]

logger = logging.getLogger(__name__)

# Unreadable files named in a log line or an error message; the rest are only counted.
NAMED_BAD_FILES = 3


def check_unreadable(feats: dict[str, Any], *, desc: str, max_bad_fraction: float, hint: str = "") -> None:
    """Raise when more than ``max_bad_fraction`` of the images behind ``feats`` could not be read.

    Args:
        feats: the output of :meth:`Encoder.images`.
        desc: the task and dataset, for the message.
        max_bad_fraction: largest tolerated share of unreadable images (``eval.max_bad_fraction``).
        hint: what to do about it; the default suggests fixing the paths or raising the threshold.

    Raises:
        ValueError: too many unreadable images, or none readable; the message names the counts and the
            first unreadable files.
    """
    skipped, total = feats["num_images_skipped"], feats["num_images_seen"]
    if total == 0:
        raise ValueError(f"{desc}: the dataset has no images")
    if skipped < total and skipped / total <= max_bad_fraction:
        return
    if skipped == total:
        problem = f"none of the {total} images could be read"
    else:
        problem = (f"{skipped} of {total} images are unreadable ({skipped / total:.0%}), more than "
                   f"eval.max_bad_fraction={max_bad_fraction}")
    named = "; ".join(bad.reason for bad in feats["bad_samples"][:NAMED_BAD_FILES])
    raise ValueError(
        f"{desc}: {problem}; first unreadable: {named}. "
        + (hint or "Fix the image paths of the dataset, or raise eval.max_bad_fraction (the --max-bad-fraction "
           "option of dinorankclip eval) to accept the loss.")
    )


class Encoder:
    """Wraps a model, its tokenizer and an optional teacher source for inference.

    Args:
        model: a :class:`~dinorankclip.models.DinoRankCLIP` (or anything with ``encode_image_all`` and
            ``encode_text``).
        tokenizer: callable from a list of strings to token ids [n, L].
        device: where to run.
        teacher: callable from a batch dict to a ``TeacherOutput``; needed only when the model injects
            teacher tokens directly.
    """

    def __init__(self, model, tokenizer: Callable, device: torch.device, teacher: Callable | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.teacher = teacher

    @torch.no_grad()
    def image_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Run the image side on one collated batch and return every image output."""
        image = batch["image"].to(self.device)
        view = batch["teacher_view"].to(self.device) if "teacher_view" in batch else None
        levels = None
        if self.teacher is not None and getattr(self.model, "injection_source", "student") == "teacher":
            levels = self.teacher(batch).patch_levels
        return self.model.encode_image_all(image, view, levels)

    @torch.no_grad()
    def images(self, loader: Iterable[dict[str, Any]], *, desc: str = "images", keys=("image_features",),
               ) -> dict[str, Any]:
        """Embed every readable image of ``loader``.

        Returns:
            A dict with one [n, E] tensor per requested key that the model produces, ``index`` [n] and,
            when the data has labels, ``label`` [n]. A key whose output is None (``student_global`` without
            a student) is left out. ``index`` holds the dataset indices of the embedded samples, so that
            skipped samples can be matched. Three more entries are always present:
            ``num_images_seen`` (int, readable and unreadable), ``num_images_skipped`` (int) and
            ``bad_samples`` (list of the skipped :class:`~dinorankclip.data.csv_dataset.BadSample`).
        """
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in (*keys, "index", "label")}
        skipped = 0
        seen = 0
        bad_samples = []
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            skipped += batch["num_bad"]
            seen += batch["num_samples"]
            bad_samples.extend(batch["bad"])
            if "image" not in batch:
                continue
            outputs = self.image_batch(batch)
            for key in keys:
                if outputs.get(key) is not None:
                    chunks[key].append(outputs[key].float().cpu())
            chunks["index"].append(batch["index"])
            if "label" in batch:
                chunks["label"].append(batch["label"])
        if skipped:
            named = "; ".join(bad.reason for bad in bad_samples[:NAMED_BAD_FILES])
            more = f" and {skipped - NAMED_BAD_FILES} more" if skipped > NAMED_BAD_FILES else ""
            logger.warning("%s: %d of %d images are unreadable and were skipped: %s%s", desc, skipped, seen,
                           named, more)
        feats: dict[str, Any] = {k: torch.cat(v) for k, v in chunks.items() if v}
        feats.update(num_images_seen=seen, num_images_skipped=skipped, bad_samples=bad_samples)
        return feats

    @torch.no_grad()
    def texts(self, texts: list[str], *, batch_size: int = 256, key: str = "text_features") -> torch.Tensor:
        """Embed strings; returns [n, E] unit vectors."""
        return F.normalize(self.texts_all(texts, batch_size=batch_size, keys=(key,))[key], dim=-1)

    @torch.no_grad()
    def texts_all(self, texts: list[str], *, batch_size: int = 256, keys=("text_features",),
                  ) -> dict[str, torch.Tensor]:
        """Embed strings and return the requested text outputs as float tensors [n, D].

        A key whose output is None (``text_student`` without a text branch) is left out.
        """
        chunks: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer([t.strip() for t in texts[start:start + batch_size]]).to(self.device)
            outputs = self.model.encode_text_all(tokens)
            for key in keys:
                if outputs.get(key) is not None:
                    chunks[key].append(outputs[key].float().cpu())
        return {key: torch.cat(values) for key, values in chunks.items() if values}
