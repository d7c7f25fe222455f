"""Image-caption and image-label datasets read from CSV/TSV files.

Paths inside a table are relative to the table's folder. A sample whose image is missing or unreadable
does not stop the run. For evaluation, ``__getitem__`` returns a :class:`BadSample` and the collate
function drops and counts it. For training (``replace_bad=True``) the dataset draws a replacement
sample from the sample's seed, so every batch is full, as all processes of a distributed job need equal
batch shapes. The same seed always gives the same replacement. The skipped samples travel with the
batch, and the trainer raises once the bad fraction passes ``data.max_bad_fraction``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .counters import BadDataError
from .images import ImageDecodeError, load_image

__all__ = [
    "MAX_REPLACEMENTS",
    "BadSample",
    "CaptionDataset",
    "LabelledImageDataset",
    "collate_samples",
    "read_table",
]

logger = logging.getLogger(__name__)

# Unreadable samples in a row after which a training dataset gives up on finding a replacement.
MAX_REPLACEMENTS = 16


@dataclass
class BadSample:
    """Placeholder for a sample that could not be read.

    Attributes:
        index: row of the table (-1 for shard samples).
        source: image file, or the shard for WebDataset samples.
        reason: what failed, for the log.
        kind: failure class counted in the metrics (``missing_file``, ``empty_image``, ``decode_error``,
            ``missing_caption``, ``caption_not_utf8``, ``duplicate_key``, ``truncated_tar``, ...).
        key: sample key (the path as written in the table, or the WebDataset ``__key__``).
    """

    index: int
    source: str
    reason: str
    kind: str = "decode_error"
    key: str | None = None


def _separator_for(path: Path, separator: str | None) -> str:
    if separator is not None:
        if separator in ("\\t", "tab"):
            return "\t"
        if len(separator) != 1:
            raise ValueError(f"field separator {separator!r} is invalid; give one character, or 'tab' for tabs")
        return separator
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def read_table(
    path: str | Path,
    columns: Sequence[str],
    *,
    separator: str | None = None,
    config_keys: dict[str, str] | None = None,
) -> list[dict[str, str]]:
    """Read a CSV/TSV file and check that it has ``columns``.

    Args:
        path: table file.
        columns: required column names.
        separator: field separator; None picks tab for .tsv and comma otherwise.
        config_keys: for error messages, the config key that names each column.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing (the message lists the columns found), the file is empty,
            it is not UTF-8 (the message names the line) or ``separator`` is not one character.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; give a CSV/TSV with columns {list(columns)}")
    delimiter = _separator_for(path, separator)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            found = reader.fieldnames or []
            for column in columns:
                if column not in found:
                    key = (config_keys or {}).get(column)
                    hint = f"; set {key}=<column> to use another column" if key else ""
                    raise ValueError(f"{path}: column {column!r} is missing; columns found: {found}{hint}")
            rows = [row for row in reader]
    except UnicodeDecodeError:
        raise ValueError(_encoding_error(path)) from None
    if not rows:
        raise ValueError(f"{path}: the table has a header but no rows")
    return rows


def _encoding_error(path: Path) -> str:
    """Return the message for a table that is not UTF-8, naming the line of its first invalid byte."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return (
            f"{path}: line {line} is not valid UTF-8 (byte 0x{data[err.start]:02x}); tables must be UTF-8, "
            "so save it as UTF-8 (for example iconv -f latin1 -t utf-8 OLD > NEW for a Latin-1 file)"
        )
    return f"{path}: the table is not valid UTF-8; save it as UTF-8"


def _split_key(key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
    if isinstance(key, tuple):
        index, seed = key
        return int(index), torch.Generator().manual_seed(int(seed))
    return int(key), None


class CaptionDataset(Dataset):
    """Image-caption pairs from a table with a file-path column and a caption column.

    Args:
        path: CSV/TSV file; image paths are relative to its folder.
        transform: callable from an RGB PIL image to a dict of view tensors (see ``PairedViews``).
        tokenizer: callable from a list of strings to token ids [n, L].
        filepath_column, caption_column: column names.
        second_caption_column: optional column with another caption of the same image (ALIP); yields ``text2``.
        separator: field separator; None picks by file extension.
        exif_transpose: apply EXIF orientation.
        decode_draft: decode large JPEGs at reduced scale, down to ``transform.decode_size``.
        replace_bad: replace an unreadable sample by another drawn from its seed (training) instead of
            returning a :class:`BadSample`.

    Captions are stripped of surrounding whitespace. An empty or whitespace-only caption stays a
    sample and is tokenised as the empty text (start and end tokens only), as evaluation does.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        transform: Callable[[Any], dict[str, torch.Tensor]],
        tokenizer: Callable[[list[str]], torch.Tensor],
        filepath_column: str = "filepath",
        caption_column: str = "caption",
        second_caption_column: str | None = None,
        separator: str | None = None,
        exif_transpose: bool = True,
        decode_draft: bool = False,
        replace_bad: bool = False,
    ) -> None:
        self.path = Path(path)
        columns = [filepath_column, caption_column] + ([second_caption_column] if second_caption_column else [])
        keys = {filepath_column: "data.filepath_column", caption_column: "data.caption_column"}
        if second_caption_column:
            keys[second_caption_column] = "data.second_caption_column"
        rows = read_table(self.path, columns, separator=separator, config_keys=keys)
        root = self.path.parent
        self.keys = [row[filepath_column] for row in rows]
        self.files = [str(root / key) for key in self.keys]
        self.captions = [row[caption_column] or "" for row in rows]
        self.captions2 = [row[second_caption_column] or "" for row in rows] if second_caption_column else None
        self.transform = transform
        self.tokenizer = tokenizer
        self.exif_transpose = exif_transpose
        self.min_decode_size = getattr(transform, "decode_size", None) if decode_draft else None
        self.replace_bad = replace_bad

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> Any:
        return load_image(self.files[index], exif_transpose=self.exif_transpose, min_size=self.min_decode_size)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | BadSample:
        """Load one pair; ``key`` is an index or ``(index, seed)`` where the seed fixes the random crop.

        With ``replace_bad`` the returned sample may come from another row; its ``skipped`` entry lists
        the :class:`BadSample` records met on the way.

        Raises:
            BadDataError: with ``replace_bad``, ``MAX_REPLACEMENTS`` unreadable samples in a row.
        """
        index, generator = _split_key(key)
        skipped: list[BadSample] = []
        while True:
            try:
                image = self._load(index)
                break
            except ImageDecodeError as err:
                bad = BadSample(index=index, source=self.files[index], reason=str(err), kind=err.kind,
                                key=self.keys[index])
                if not self.replace_bad:
                    return bad
                skipped.append(bad)
                if len(skipped) >= MAX_REPLACEMENTS:
                    raise BadDataError(
                        f"{self.path}: {len(skipped)} unreadable images in a row, the last {bad.source} "
                        f"({bad.reason}); check that the image paths are relative to the table's folder"
                    ) from None
                # The replacement and its crop depend only on the original seed and the attempt number.
                seed = int(key[1]) if isinstance(key, tuple) else index
                generator = torch.Generator().manual_seed((seed * 1_000_003 + len(skipped)) % (2**63))
                index = int(torch.randint(len(self.files), (), generator=generator))
        sample = self.transform(image, generator)
        sample["text"] = self.tokenizer([self.captions[index].strip()])[0]
        if self.captions2 is not None:
            sample["text2"] = self.tokenizer([self.captions2[index].strip()])[0]
        sample["index"] = index
        sample["key"] = self.keys[index]
        if self.replace_bad:
            sample["skipped"] = skipped
        return sample


class LabelledImageDataset(Dataset):
    """Images with integer class labels from a table with ``filepath`` and ``label`` columns."""

    def __init__(
        self,
        path: str | Path,
        *,
        transform: Callable[[Any], dict[str, torch.Tensor]],
        filepath_column: str = "filepath",
        label_column: str = "label",
        separator: str | None = None,
        exif_transpose: bool = True,
    ) -> None:
        self.path = Path(path)
        rows = read_table(self.path, [filepath_column, label_column], separator=separator)
        self.files = [str(self.path.parent / row[filepath_column]) for row in rows]
        try:
            self.labels = [int(row[label_column]) for row in rows]
        except ValueError as err:
            raise ValueError(f"{self.path}: column {label_column!r} must hold integer class indices ({err})") from None
        self.transform = transform
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | BadSample:
        index, generator = _split_key(key)
        try:
            image = load_image(self.files[index], exif_transpose=self.exif_transpose)
        except ImageDecodeError as err:
            return BadSample(index=index, source=self.files[index], reason=str(err), kind=err.kind)
        sample = self.transform(image, generator)
        sample["label"] = self.labels[index]
        sample["index"] = index
        return sample


def collate_samples(samples: list[dict[str, Any] | BadSample]) -> dict[str, Any]:
    """Stack good samples and count bad ones.

    Returns:
        A dict with the stacked tensors of the good samples (``image``, ``teacher_view``, ``text``, ...),
        ``index`` [B], ``key`` (list of B sample keys: the image path as written in the table),
        ``num_bad`` (int), ``num_samples`` (int, good and bad) and ``bad`` (list of :class:`BadSample`,
        the bad samples given plus those listed under ``skipped`` in a good sample).
    """
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    for sample in good:
        bad.extend(sample.pop("skipped", ()))
    batch: dict[str, Any] = {"num_bad": len(bad), "bad": bad, "num_samples": len(good) + len(bad)}
    if good:
        for key in good[0]:
            values = [s[key] for s in good]
            if torch.is_tensor(values[0]):
                batch[key] = torch.stack(values)
            elif isinstance(values[0], str):
                batch[key] = values
            else:
                batch[key] = torch.tensor(values)
    return batch
