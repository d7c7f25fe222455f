"""Labelled evaluation datasets by name, from their standard local layouts.

:func:`open_labelled` turns ``(name, source)`` into a :class:`LabelledSet`. ``source`` is one of:

* a CSV/TSV file with ``filepath,label`` columns (paths relative to the file) and ``classnames.txt``
  beside it;
* a folder in CLIP_benchmark's WebDataset layout (``classnames.txt`` and ``<split>/nshards.txt``);
* a folder in the dataset's standard layout, read with torchvision (``download=False``) for
  :data:`TORCHVISION_LAYOUTS`, as an image folder for the ImageNet family and ObjectNet
  (:mod:`.folders`), in the official layout for CUB-200-2011, or as a generic class-per-subfolder tree.

Every dataset yields the same sample dicts as the training data (the evaluation views plus ``label``
and ``index``) and a :class:`~dinorankclip.data.csv_dataset.BadSample` for an unreadable image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..data.csv_dataset import BadSample, LabelledImageDataset, read_table
from ..data.images import ImageDecodeError, load_image, to_rgb

__all__ = [
    "CANONICAL_NAMES",
    "TORCHVISION_LAYOUTS",
    "FileLabelDataset",
    "LabelledSet",
    "canonical_name",
    "open_labelled",
]

logger = logging.getLogger(__name__)

# Accepted spellings of dataset names, mapped to the one used in results.
CANONICAL_NAMES = {
    "cifar10": "cifar10", "cifar-10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100",
    "stl10": "stl10", "stl-10": "stl10",
    "svhn": "svhn",
    "gtsrb": "gtsrb",
    "flowers102": "flowers102", "flowers": "flowers102", "flowers-102": "flowers102",
    "dtd": "dtd",
    "fgvc_aircraft": "fgvc_aircraft", "aircraft": "fgvc_aircraft", "fgvc-aircraft": "fgvc_aircraft",
    "stanford_cars": "stanford_cars", "cars": "stanford_cars", "stanford-cars": "stanford_cars",
    "food101": "food101", "food-101": "food101",
    "cub200": "cub200", "cub": "cub200", "cub-200": "cub200", "cub_200_2011": "cub200",
    "imagenet": "imagenet", "imagenet1k": "imagenet", "imagenet-1k": "imagenet",
    "imagenetv2": "imagenetv2", "imagenet-v2": "imagenetv2",
    "imagenet-r": "imagenet-r", "imagenet_r": "imagenet-r",
    "imagenet-a": "imagenet-a", "imagenet_a": "imagenet-a",
    "imagenet-sketch": "imagenet-sketch", "imagenet_sketch": "imagenet-sketch",
    "objectnet": "objectnet",
}


def canonical_name(name: str) -> str:
    """Return the canonical spelling of a dataset name; unknown names are returned lower-cased."""
    return CANONICAL_NAMES.get(name.lower(), name.lower())


@dataclass(frozen=True)
class _TorchvisionLayout:
    cls_name: str  # torchvision.datasets class
    layout: str  # expected files under the root, for error messages
    splits: tuple[str, ...]
    split_arg: str = "split"  # "train" for the CIFAR classes, which take train=True/False
    kwargs: dict[str, Any] = field(default_factory=dict)
    takes_loader: bool = False  # the class accepts loader= (file-backed datasets)


TORCHVISION_LAYOUTS = {
    "cifar10": _TorchvisionLayout("CIFAR10", "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
                                  ("train", "test"), split_arg="train"),
    "cifar100": _TorchvisionLayout("CIFAR100", "ROOT/cifar-100-python/{train,test,meta}", ("train", "test"),
                                   split_arg="train"),
    "stl10": _TorchvisionLayout("STL10", "ROOT/stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin}",
                                ("train", "test")),
    "svhn": _TorchvisionLayout("SVHN", "ROOT/{train,test,extra}_32x32.mat", ("train", "test", "extra")),
    "gtsrb": _TorchvisionLayout("GTSRB", "ROOT/gtsrb/GTSRB/{Training,Final_Test/Images}/ and "
                                         "ROOT/gtsrb/GT-final_test.csv", ("train", "test")),
    "flowers102": _TorchvisionLayout("Flowers102", "ROOT/flowers-102/{jpg/,imagelabels.mat,setid.mat}",
                                     ("train", "val", "test"), takes_loader=True),
    "dtd": _TorchvisionLayout("DTD", "ROOT/dtd/dtd/{images/<class>/,labels/{train,val,test}1.txt}",
                              ("train", "val", "test"), kwargs={"partition": 1}, takes_loader=True),
    "fgvc_aircraft": _TorchvisionLayout(
        "FGVCAircraft", "ROOT/fgvc-aircraft-2013b/data/{images/,variants.txt,images_variant_<split>.txt}",
        ("train", "val", "trainval", "test"), kwargs={"annotation_level": "variant"}, takes_loader=True),
    "stanford_cars": _TorchvisionLayout(
        "StanfordCars", "ROOT/stanford_cars/{cars_train/,cars_test/,devkit/cars_meta.mat,devkit/cars_train_annos.mat,"
                        "cars_test_annos_withlabels.mat}", ("train", "test"), takes_loader=True),
    "food101": _TorchvisionLayout("Food101", "ROOT/food-101/{images/<class>/,meta/{train,test}.json}",
                                  ("train", "test"), takes_loader=True),
}


@dataclass
class LabelledSet:
    """A labelled evaluation dataset and what the zero-shot classifier needs to know about it.

    Attributes:
        name: canonical dataset name (selects CLIP's class names and templates).
        dataset: map-style or iterable dataset of sample dicts with ``label`` and ``index``.
        classnames: class names by label index; None means CLIP's published list for ``name``.
        classnames_source: where ``classnames`` came from (for the result record).
        templates_file: the dataset's own template file (WebDataset layout), or None.
        layout: which reader was used (``csv``, ``torchvision``, ``wds``, ``image_folder``, ``cub``, ...).
        source: the file or folder it was read from.
    """

    name: str
    dataset: Dataset
    classnames: list[str] | None
    classnames_source: str | None
    layout: str
    source: str
    templates_file: str | None = None


class FileLabelDataset(Dataset):
    """Images from a list of files with integer labels, decoded like the training data."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], *, transform: Callable,
                 exif_transpose: bool = True) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = [int(label) for label in labels]
        self.transform = transform
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        try:
            image = load_image(self.files[index], exif_transpose=self.exif_transpose)
        except ImageDecodeError as err:
            return BadSample(index=index, source=self.files[index], reason=str(err))
        sample = self.transform(image)
        sample["label"] = self.labels[index]
        sample["index"] = index
        return sample


class _TorchvisionSamples(Dataset):
    """Adapts a torchvision classification dataset (PIL image, label) to sample dicts."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        try:
            image, label = self.base[index]
        except (ImageDecodeError, OSError) as err:
            return BadSample(index=index, source=f"{type(self.base).__name__}[{index}]", reason=str(err))
        sample = self.transform(to_rgb(image))
        sample["label"] = int(label)
        sample["index"] = index
        return sample


def _load_rgb(path: str) -> Any:
    return load_image(path)


def _open_torchvision(name: str, root: Path, split: str, transform: Callable) -> LabelledSet:
    import torchvision.datasets

    spec = TORCHVISION_LAYOUTS[name]
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; allowed splits: {', '.join(spec.splits)}")
    kwargs = dict(spec.kwargs)
    if spec.split_arg == "train":
        kwargs["train"] = split == "train"
    else:
        kwargs["split"] = split
    if spec.takes_loader:
        kwargs["loader"] = _load_rgb
    cls = getattr(torchvision.datasets, spec.cls_name)
    try:
        base = cls(str(root), download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"dataset {name!r} was not found under {str(root)!r} (torchvision {spec.cls_name}, download=False: "
            f"{err}); expected layout: {spec.layout}"
        ) from None
    return LabelledSet(name=name, dataset=_TorchvisionSamples(base, transform), classnames=None,
                       classnames_source=None, layout="torchvision", source=str(root))


def _open_csv(name: str, path: Path, split: str | None, transform: Callable) -> LabelledSet:
    """Open a labels table; when it has a ``split`` column and ``split`` is given, only those rows are read."""
    rows = read_table(path, ["filepath", "label"])
    names_file = path.parent / "classnames.txt"
    if split is not None and "split" in rows[0]:
        splits = sorted({row["split"] for row in rows})
        if split not in splits:
            raise ValueError(f"{path}: no rows of split {split!r}; splits in the file: {', '.join(splits)}")
        rows = [row for row in rows if row["split"] == split]
        try:
            labels = [int(row["label"]) for row in rows]
        except ValueError as err:
            raise ValueError(f"{path}: column 'label' must hold integer class indices ({err})") from None
        dataset: Dataset = FileLabelDataset([str(path.parent / row["filepath"]) for row in rows], labels,
                                            transform=transform)
    else:
        dataset = LabelledImageDataset(path, transform=transform)
    return LabelledSet(name=name, dataset=dataset, classnames=None,
                       classnames_source=str(names_file) if names_file.is_file() else None, layout="csv",
                       source=str(path))


def open_labelled(name: str, source: str | Path, *, split: str | None = "test", transform: Callable) -> LabelledSet:
    """Open a labelled dataset for zero-shot classification or the linear probe.

    Args:
        name: dataset name (any spelling in :data:`CANONICAL_NAMES`, or a free name for CSVs, image folders
            and WebDataset folders).
        source: a labels CSV/TSV, or the dataset's root folder.
        split: which split to read (``test``, ``train``, ...); None, or a CSV without a ``split`` column,
            reads every row. Plain image folders have no splits and are read whole.
        transform: callable from an RGB PIL image to the view dict (see ``PairedViews``).

    Raises:
        FileNotFoundError: the source does not exist or lacks the files of the expected layout (the message
            names the layout).
        ValueError: an unknown split, or a folder whose layout cannot be recognised.
    """
    from . import folders, wds_layout

    canonical = canonical_name(name)
    path = Path(source)
    if not path.exists():
        layout = TORCHVISION_LAYOUTS[canonical].layout if canonical in TORCHVISION_LAYOUTS else None
        hint = f"; expected layout: {layout}" if layout else folders.layout_hint(canonical)
        raise FileNotFoundError(f"dataset {name!r}: {str(path)!r} does not exist{hint}")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv", ".tab"):
            raise ValueError(f"dataset {name!r}: {path} is not a CSV/TSV labels table or a dataset folder")
        return _open_csv(canonical, path, split, transform)
    split = split or "test"
    if wds_layout.is_wds_root(path):
        return wds_layout.open_wds_classification(canonical, path, split=split, transform=transform)
    if canonical in TORCHVISION_LAYOUTS:
        return _open_torchvision(canonical, path, split, transform)
    if canonical == "cub200":
        return folders.open_cub(path, split=split, transform=transform)
    if canonical == "objectnet":
        return folders.open_objectnet(path, transform=transform)
    if canonical in folders.IMAGENET_FAMILY:
        return folders.open_imagenet_family(canonical, path, transform=transform)
    return folders.open_image_folder(canonical, path, transform=transform)
