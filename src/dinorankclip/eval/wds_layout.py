"""CLIP_benchmark's WebDataset evaluation layout.

The layout (as written by CLIP_benchmark's ``clip_benchmark_export_wds``)::

    ROOT/
      classnames.txt                          one class name per line, line i = label i
      zeroshot_classification_templates.txt   optional: one template per line
      dataset_type.txt                        optional: "classification" (default) or "retrieval"
      test/nshards.txt                        number of shards n
      test/0.tar … test/{n-1}.tar             samples: <key>.{webp,png,jpg,jpeg} and <key>.cls

Only classification data is read here; a retrieval folder raises ValueError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..data.csv_dataset import BadSample
from ..data.images import ImageDecodeError, decode_image
from .datasets import LabelledSet
from .prompts import load_classnames

__all__ = ["WdsClassification", "is_wds_root", "open_wds_classification"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
LAYOUT = "ROOT/{classnames.txt,<split>/nshards.txt,<split>/0.tar,...} (CLIP_benchmark WebDataset layout)"


def is_wds_root(path: Path) -> bool:
    """Return whether ``path`` looks like a CLIP_benchmark WebDataset folder."""
    return path.is_dir() and any(p.name == "nshards.txt" for p in path.glob("*/nshards.txt"))


class WdsClassification(IterableDataset):
    """Samples of one split's shards, in shard order; each worker reads every k-th shard.

    ``index`` counts samples within the shard list, so it is unique only with one worker.
    """

    def __init__(self, shards: list[str], transform: Callable) -> None:
        self.shards = shards
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Any] | BadSample]:
        import webdataset as wds

        info = get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        index = 0
        for sample in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False):
            key = sample.get("__key__", f"#{index}")
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None or "cls" not in sample:
                yield BadSample(index=index, source=key, reason="sample has no image or no .cls label")
            else:
                try:
                    image = decode_image(sample[ext], name=f"{key}.{ext}")
                except ImageDecodeError as err:
                    yield BadSample(index=index, source=key, reason=str(err))
                else:
                    out = self.transform(image)
                    out["label"] = int(sample["cls"].decode().strip())
                    out["index"] = index
                    yield out
            index += 1


def open_wds_classification(name: str, root: Path, *, split: str, transform: Callable) -> LabelledSet:
    """Open ``root/<split>`` shards with ``root/classnames.txt``.

    Raises:
        FileNotFoundError: the split's ``nshards.txt``, a shard or ``classnames.txt`` is missing.
        ValueError: the folder contains a retrieval dataset.
    """
    kind_file = root / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
    if kind != "classification":
        raise ValueError(f"dataset {name!r}: {root} is a WebDataset {kind!r} dataset; only classification is read "
                         "from this layout (give retrieval data as a caption CSV or Karpathy JSON)")
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(f"dataset {name!r}: {nshards_file} is missing; expected layout: {LAYOUT}")
    count = int(nshards_file.read_text().strip())
    shards = [str(root / split / f"{i}.tar") for i in range(count)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: shards {missing[:3]} are missing; expected layout: {LAYOUT}")
    names_file = root / "classnames.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"dataset {name!r}: {names_file} is missing; expected layout: {LAYOUT}")
    templates = root / "zeroshot_classification_templates.txt"
    return LabelledSet(name=name, dataset=WdsClassification(shards, transform), classnames=load_classnames(names_file),
                       classnames_source=str(names_file), layout="wds", source=str(root),
                       templates_file=str(templates) if templates.is_file() else None)
