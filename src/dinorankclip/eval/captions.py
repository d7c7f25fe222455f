"""Image-caption evaluation data: caption CSVs and Karpathy-split JSON (Flickr30k, COCO)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.csv_dataset import BadSample, read_table
from ..data.images import ImageDecodeError, load_image

__all__ = ["CaptionedImages", "open_captions"]

logger = logging.getLogger(__name__)

KARPATHY_LAYOUT = (
    '{"images": [{"filename": ..., "filepath": optional subfolder, "split": "train|val|test|restval", '
    '"sentences": [{"raw": caption}, ...]}, ...]}'
)


class CaptionedImages(Dataset):
    """Distinct images with every caption mapped to its image.

    Attributes:
        files: distinct image paths in first-seen order.
        texts: every caption, in table order.
        text_to_image: [T] index into ``files`` for each caption.
        split: the split that was read, or None for a CSV (read whole).
        source: the file the captions came from.
        image_root: the folder image paths were resolved against.
        num_images_without_captions: Karpathy entries of the split that were left out for having no captions.
    """

    def __init__(self, path: str | Path, *, transform: Callable | None, filepath_column: str = "filepath",
                 caption_column: str = "caption", separator: str | None = None) -> None:
        """Read a ``filepath,caption`` table; an image may appear on several rows."""
        path = Path(path)
        rows = read_table(path, [filepath_column, caption_column], separator=separator)
        position: dict[str, int] = {}
        files: list[str] = []
        texts: list[str] = []
        owners: list[int] = []
        for row in rows:
            file = str(path.parent / row[filepath_column])
            if file not in position:
                position[file] = len(files)
                files.append(file)
            texts.append(row[caption_column] or "")
            owners.append(position[file])
        self._set(files, texts, owners, transform=transform, split=None, source=str(path), image_root=path.parent)

    def _set(self, files: list[str], texts: list[str], owners: list[int], *, transform: Callable | None,
             split: str | None, source: str, image_root: Path, num_images_without_captions: int = 0) -> None:
        self.files = files
        self.texts = texts
        self.text_to_image = torch.tensor(owners, dtype=torch.long)
        self.transform = transform
        self.split = split
        self.source = source
        self.image_root = image_root
        self.num_images_without_captions = num_images_without_captions

    def path_hint(self) -> str:
        """Say where the images were looked for and which option moves that folder, for error messages."""
        example = f", e.g. {self.files[0]}" if self.files else ""
        if self.split is None:
            return (f"Relative image paths of a caption table are resolved against its folder {self.image_root}"
                    f"{example}; fix the filepath column or the files.")
        return (f"Images of a Karpathy JSON are looked up as IMAGE_FOLDER/filepath/filename with IMAGE_FOLDER "
                f"{self.image_root}{example}; give the image folder with --retrieval-images "
                "(eval.retrieval_image_root).")

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> CaptionedImages:
        """Read a caption table (the same as the constructor)."""
        return cls(path, **kwargs)

    @classmethod
    def from_karpathy(cls, path: str | Path, *, split: str = "test", image_root: str | Path | None = None,
                      transform: Callable | None) -> CaptionedImages:
        """Read one split of a Karpathy-split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``).

        Image paths are ``image_root / filepath / filename`` (``filepath`` only where the entry has one, as
        in COCO's ``val2014``); ``image_root`` defaults to the JSON's folder.

        An entry with an empty ``sentences`` list is left out with a warning, because an image without
        captions can never be retrieved.

        Raises:
            ValueError: the file is not in the Karpathy layout, an entry lacks ``filename``, ``sentences`` or
                a sentence's text, or the split has no images with captions.
        """
        path = Path(path)
        root = Path(image_root) if image_root is not None else path.parent
        try:
            entries = json.loads(path.read_text())["images"]
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a Karpathy-split JSON ({err}); expected {KARPATHY_LAYOUT}") from None
        chosen = [e for e in entries if e.get("split") == split]
        if not chosen:
            splits = sorted({str(e.get("split")) for e in entries})
            raise ValueError(f"{path}: no images in split {split!r}; splits in the file: {', '.join(splits)}")
        files, texts, owners = [], [], []
        without_captions = []
        for number, entry in enumerate(chosen):
            _check_entry(path, entry, number, split)
            if not entry["sentences"]:
                without_captions.append(entry["filename"])
                continue
            image_index = len(files)
            files.append(str(root / entry.get("filepath", "") / entry["filename"]))
            for sentence in entry["sentences"]:
                texts.append(sentence["raw"] if "raw" in sentence else " ".join(sentence["tokens"]))
                owners.append(image_index)
        if without_captions:
            logger.warning("%s: %d of %d images of split %r have no captions and are left out, e.g. %s", path,
                           len(without_captions), len(chosen), split, ", ".join(without_captions[:3]))
        if not files:
            raise ValueError(f"{path}: none of the {len(chosen)} images of split {split!r} has captions; "
                             "fill their \"sentences\" lists")
        dataset = cls.__new__(cls)
        dataset._set(files, texts, owners, transform=transform, split=split, source=str(path), image_root=root,
                     num_images_without_captions=len(without_captions))
        return dataset

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


def _check_entry(path: Path, entry: Any, number: int, split: str) -> None:
    """Raise a ValueError naming the file, the entry and the missing key of a malformed Karpathy entry."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: image {number} of split {split!r} is {type(entry).__name__}, not an object; "
                         f"expected {KARPATHY_LAYOUT}")
    name = entry.get("filename")
    label = f"image {name!r}" if name is not None else f"image {number} of split {split!r}"
    for key in ("filename", "sentences"):
        if key not in entry:
            raise ValueError(f"{path}: {label} has no {key!r} key; expected {KARPATHY_LAYOUT}")
    if not isinstance(entry["sentences"], list):
        raise ValueError(f"{path}: {label} has 'sentences' of type {type(entry['sentences']).__name__}; "
                         f"expected a list, as in {KARPATHY_LAYOUT}")
    for position, sentence in enumerate(entry["sentences"]):
        if not isinstance(sentence, dict) or ("raw" not in sentence and "tokens" not in sentence):
            raise ValueError(f"{path}: sentence {position} of {label} has neither 'raw' nor 'tokens'; "
                             f"expected {KARPATHY_LAYOUT}")


def open_captions(source: str | Path, *, split: str = "test", image_root: str | Path | None = None,
                  transform: Callable | None) -> CaptionedImages:
    """Open a caption CSV/TSV (read whole) or a Karpathy JSON (one split).

    Raises:
        FileNotFoundError: ``source`` does not exist.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"caption file {str(source)!r} does not exist; give a filepath,caption CSV or a "
                                "Karpathy-split JSON")
    if source.suffix.lower() == ".json":
        return CaptionedImages.from_karpathy(source, split=split, image_root=image_root, transform=transform)
    return CaptionedImages.from_csv(source, transform=transform)
