"""Image-folder evaluation layouts: the ImageNet family, ObjectNet, CUB-200-2011 and plain class folders.

Class order and names:

* ImageNet, ImageNet-Sketch, ImageNet-R, ImageNet-A: one folder per WordNet id (``n01440764``). The label
  is the id's ImageNet-1k index in the standard order (timm's ``imagenet_synsets.txt``), and the class
  names are CLIP's ImageNet names. ImageNet-R and ImageNet-A hold 200 of the 1000 classes, so their
  classifier has only the classes that have a folder, as in CLIP's evaluation.
* ImageNet-V2: folders ``0`` … ``999`` are the ImageNet-1k indices (sorted as numbers, not as strings).
* ObjectNet: ``mappings/folder_to_objectnet_label.json`` and ``mappings/objectnet_to_imagenet_1k.json``
  from the ObjectNet release select the 113 classes that overlap ImageNet-1k; the classifier uses their
  ObjectNet names.
* CUB-200-2011: the official ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt`` and
  ``classes.txt``; class ``NNN.Black_footed_Albatross`` is named ``Black footed Albatross``.
* Any other folder: one subfolder per class in sorted order (numeric when every name is an integer);
  names from ``classnames.txt`` in the root when present, else the folder names with ``_`` as spaces.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from .datasets import FileLabelDataset, LabelledSet
from .prompts import load_classnames, resolve_prompts

__all__ = [
    "IMAGENET_FAMILY",
    "imagenet_synsets",
    "layout_hint",
    "open_cub",
    "open_image_folder",
    "open_imagenet_family",
    "open_objectnet",
]

logger = logging.getLogger(__name__)

IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet-r", "imagenet-a", "imagenet-sketch")

_LAYOUTS = {
    "imagenet": "ROOT/<wnid>/*.JPEG (the ILSVRC-2012 validation images sorted into one folder per WordNet id)",
    "imagenet-sketch": "ROOT/<wnid>/*.JPEG (one folder per WordNet id)",
    "imagenet-r": "ROOT/<wnid>/*.jpg (200 WordNet-id folders)",
    "imagenet-a": "ROOT/<wnid>/*.jpg (200 WordNet-id folders)",
    "imagenetv2": "ROOT/<0..999>/*.jpeg (one folder per ImageNet-1k class index)",
    "objectnet": "ROOT/images/<folder>/*.png and ROOT/mappings/{folder_to_objectnet_label.json,"
                 "objectnet_to_imagenet_1k.json}",
    "cub200": "ROOT/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/} "
              "(ROOT may also be the folder that contains CUB_200_2011/)",
}


def layout_hint(name: str) -> str:
    """Return '; expected layout: ...' for a known folder dataset, or a generic hint."""
    if name in _LAYOUTS:
        return f"; expected layout: {_LAYOUTS[name]}"
    return "; give a labels CSV (filepath,label) or a folder with one subfolder per class"


def imagenet_synsets() -> list[str]:
    """Read the 1000 ImageNet-1k WordNet ids in class-index order (the copy shipped with timm)."""
    import timm.data

    path = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _class_folders(root: Path) -> list[Path]:
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if all(p.name.isdigit() for p in folders):
        return sorted(folders, key=lambda p: int(p.name))
    return sorted(folders, key=lambda p: p.name)


def _collect(folders_and_labels: list[tuple[Path, int]]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for folder, label in folders_and_labels:
        for file in _image_files(folder):
            files.append(str(file))
            labels.append(label)
    return files, labels


def open_imagenet_family(name: str, root: Path, *, transform: Callable) -> LabelledSet:
    """Open ImageNet-1k, -V2, -R, -A or -Sketch from one folder per class (see the module docstring)."""
    folders = _class_folders(root)
    if not folders:
        raise FileNotFoundError(f"dataset {name!r}: {root} has no class folders{layout_hint(name)}")
    imagenet_names = resolve_prompts("imagenet").classnames
    if name == "imagenetv2":
        bad = [p.name for p in folders if not p.name.isdigit() or int(p.name) >= 1000]
        if bad:
            raise ValueError(f"dataset {name!r}: folders {bad[:5]} are not ImageNet class indices{layout_hint(name)}")
        indices = [int(p.name) for p in folders]
    else:
        position = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
        bad = [p.name for p in folders if p.name not in position]
        if bad:
            raise ValueError(f"dataset {name!r}: folders {bad[:5]} are not ImageNet-1k WordNet ids"
                             f"{layout_hint(name)}")
        indices = [position[p.name] for p in folders]
    if name in ("imagenet-r", "imagenet-a"):
        # The classifier holds only the classes present, so labels are positions among them.
        classnames = [imagenet_names[i] for i in indices]
        files, labels = _collect([(folder, k) for k, folder in enumerate(folders)])
        source = f"CLIP ImageNet names of the {len(indices)} classes present"
    else:
        classnames = imagenet_names
        files, labels = _collect(list(zip(folders, indices, strict=True)))
        source = "CLIP ImageNet names"
    if not files:
        raise FileNotFoundError(f"dataset {name!r}: no images under {root}{layout_hint(name)}")
    return LabelledSet(name=name, dataset=FileLabelDataset(files, labels, transform=transform), classnames=classnames,
                       classnames_source=source, layout="image_folder", source=str(root))


def open_objectnet(root: Path, *, transform: Callable) -> LabelledSet:
    """Open ObjectNet restricted to its 113 classes that overlap ImageNet-1k."""
    mappings = root / "mappings"
    folder_to_label_file = mappings / "folder_to_objectnet_label.json"
    overlap_file = mappings / "objectnet_to_imagenet_1k.json"
    for file in (folder_to_label_file, overlap_file):
        if not file.is_file():
            raise FileNotFoundError(f"dataset 'objectnet': {file} is missing{layout_hint('objectnet')}")
    folder_to_label = json.loads(folder_to_label_file.read_text())
    overlapping = set(json.loads(overlap_file.read_text()))
    images = root / "images" if (root / "images").is_dir() else root
    folders = sorted(f for f, label in folder_to_label.items() if label in overlapping and (images / f).is_dir())
    if not folders:
        raise FileNotFoundError(f"dataset 'objectnet': no overlapping class folders under {images}"
                                f"{layout_hint('objectnet')}")
    classnames = [folder_to_label[f] for f in folders]
    files, labels = _collect([(images / f, k) for k, f in enumerate(folders)])
    return LabelledSet(name="objectnet", dataset=FileLabelDataset(files, labels, transform=transform),
                       classnames=classnames, classnames_source=str(folder_to_label_file), layout="objectnet",
                       source=str(root))


def open_cub(root: Path, *, split: str, transform: Callable) -> LabelledSet:
    """Open CUB-200-2011 in its official layout; ``split`` is ``train`` or ``test`` (the official flag)."""
    if (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    needed = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    for file in needed:
        if not (root / file).is_file():
            raise FileNotFoundError(f"dataset 'cub200': {root / file} is missing{layout_hint('cub200')}")
    if split not in ("train", "test"):
        raise ValueError(f"dataset 'cub200' has no split {split!r}; allowed splits: train, test")

    def table(file: str) -> dict[str, str]:
        rows = (line.split(maxsplit=1) for line in (root / file).read_text().splitlines() if line.strip())
        return {key: value.strip() for key, value in rows}

    paths, classes, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    class_ids = table("classes.txt")
    classnames = [class_ids[k].split(".", 1)[-1].replace("_", " ") for k in sorted(class_ids, key=int)]
    want = "1" if split == "train" else "0"
    ids = sorted((i for i in paths if is_train.get(i) == want), key=int)
    files = [str(root / "images" / paths[i]) for i in ids]
    labels = [int(classes[i]) - 1 for i in ids]
    return LabelledSet(name="cub200", dataset=FileLabelDataset(files, labels, transform=transform),
                       classnames=classnames, classnames_source=str(root / "classes.txt"), layout="cub",
                       source=str(root))


def open_image_folder(name: str, root: Path, *, transform: Callable) -> LabelledSet:
    """Open a generic class-per-subfolder tree (see the module docstring for names and order)."""
    folders = _class_folders(root)
    if not folders:
        raise FileNotFoundError(f"dataset {name!r}: {root} has no class subfolders{layout_hint(name)}")
    names_file = root / "classnames.txt"
    if names_file.is_file():
        classnames = load_classnames(names_file)
        if len(classnames) != len(folders):
            raise ValueError(f"dataset {name!r}: {names_file} names {len(classnames)} classes but {root} has "
                             f"{len(folders)} class folders")
        source = str(names_file)
    else:
        classnames = [p.name.replace("_", " ") for p in folders]
        source = "folder names"
    files, labels = _collect([(folder, k) for k, folder in enumerate(folders)])
    if not files:
        raise FileNotFoundError(f"dataset {name!r}: no images under {root}{layout_hint(name)}")
    return LabelledSet(name=name, dataset=FileLabelDataset(files, labels, transform=transform), classnames=classnames,
                       classnames_source=source, layout="image_folder", source=str(root))
