#!/usr/bin/env python
"""Build the bundled sample data (``src/dinorankclip/sample_data``) from the full real-data folder.

The bundled copy is a deterministic subset of the source folder, small enough to ship inside the package
for the demo and the test suite:

- ``flickr8k``: all 1000 images and 5000 captions, images downscaled to a shorter side of 128 px, plus
  per-split caption files and ``train_pairs.csv`` (a second caption per training row, for ALIP).
- ``cifar10`` (50 train + 50 test per class), ``gtsrb`` (10 per class), ``svhn`` and ``cifar100`` (all
  images): image files copied byte for byte.
- ``flowers102`` (2 per class), ``dtd`` (10 per class), ``cub200`` (2 per class): downscaled to a shorter
  side of 128 px.
- ``clip_prompts``: ``prompts.json`` copied unchanged.

Sampling takes the first N images of each class in sorted ``filepath`` order, so it uses no random numbers.
Every output folder gets the source ``SOURCE.md`` followed by a "Bundled subset" section, and the output
root gets a ``README.md`` with measured counts and sizes.

Re-running the script with the same source and the same Pillow build writes byte-identical files: JPEG
settings are fixed, no metadata or timestamps are stored and CSV rows keep the source order. A different
Pillow or libjpeg version may produce different JPEG bytes.

Usage:
    python scripts/make_sample_data.py --source /path/to/shared/data
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageOps

LOG = logging.getLogger("make_sample_data")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "src" / "dinorankclip" / "sample_data"

SHORT_SIDE = 128
# Quality 80 keeps the folder under MAX_TOTAL_BYTES. With quality 85 the folder measured 14.0 MB, of which
# 7.4 MB were Flickr8k images (Pillow 13.0.0).
JPEG_QUALITY = 80
# Explicit encoder options so the output does not depend on Pillow's defaults. Without "exif" or
# "icc_profile" arguments, Pillow writes no metadata.
JPEG_OPTIONS = {"quality": JPEG_QUALITY, "subsampling": "4:2:0", "optimize": True, "progressive": False}

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 13 * 1000 * 1000

FLICKR_SPLITS = ("train", "dev", "test")

# Folders this script writes. Only these (and README.md) are deleted from --out before a rebuild.
OUTPUT_FOLDERS = ("flickr8k", "cifar10", "cifar100", "gtsrb", "svhn", "flowers102", "dtd", "cub200", "clip_prompts")


@dataclass(frozen=True)
class LabelledSubset:
    """Sampling and processing rule for one labelled classification folder."""

    name: str
    per_class: int | None  # None keeps every image.
    resize: bool  # True: downscale to SHORT_SIDE and re-encode as JPEG. False: copy bytes.
    extra_files: tuple[str, ...] = ()


LABELLED_SUBSETS = (
    LabelledSubset("gtsrb", per_class=10, resize=False),
    LabelledSubset("svhn", per_class=None, resize=False),
    LabelledSubset("cifar100", per_class=None, resize=False),
    LabelledSubset("flowers102", per_class=2, resize=True),
    LabelledSubset("dtd", per_class=10, resize=True),
    LabelledSubset("cub200", per_class=2, resize=True, extra_files=("classes_official.txt",)),
)
CIFAR10_PER_CLASS_AND_SPLIT = 50


# ---------------------------------------------------------------------------------------------------------
# File helpers


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV file with a header row and return its column names and rows."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: CSV file is empty, expected a header row")
        return list(reader.fieldnames), rows


def write_csv(path: Path, fieldnames: list[str], rows: Iterable[dict[str, str]]) -> None:
    """Write rows with the csv module's default dialect (CRLF line ends, as in the source files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def copy_file(src: Path, dst: Path) -> None:
    """Copy file contents only, so no timestamps or permissions from the source are carried over."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())


def downscale_image(src: Path, dst: Path, short_side: int = SHORT_SIDE) -> tuple[int, int]:
    """Write ``src`` as a JPEG whose shorter side is ``short_side`` px (bicubic, aspect ratio kept).

    Images whose shorter side is already at most ``short_side`` are copied unchanged and never upscaled,
    so ``src`` must be a JPEG file too. EXIF orientation is applied before resizing.
    Returns the size of the written image.
    """
    if dst.suffix.lower() not in (".jpg", ".jpeg"):
        raise ValueError(f"{dst}: downscaled images are written as JPEG, so the name must end in .jpg or .jpeg")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as opened:
        orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
        if min(opened.size) <= short_side and orientation == 1:
            copy_file(src, dst)
            return opened.size

        image = ImageOps.exif_transpose(opened)
        width, height = image.size

        target = min(short_side, width, height)
        if width <= height:
            new_size = (target, round(height * target / width))
        else:
            new_size = (round(width * target / height), target)

        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        resized = image.resize(new_size, Image.Resampling.BICUBIC)
        resized.save(dst, format="JPEG", **JPEG_OPTIONS)
        return new_size


def first_per_class(
    rows: list[dict[str, str]], per_class: int | None, key: Callable[[dict[str, str]], object]
) -> list[dict[str, str]]:
    """Select the first ``per_class`` rows of each class in sorted filepath order, keeping the input row order."""
    if per_class is None:
        return list(rows)
    by_class: dict[object, list[str]] = defaultdict(list)
    for row in rows:
        by_class[key(row)].append(row["filepath"])
    selected_paths = {path for paths in by_class.values() for path in sorted(paths)[:per_class]}
    return [row for row in rows if row["filepath"] in selected_paths]


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def count_images(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))


def write_source_md(src_dir: Path, out_dir: Path, bundled_section: str) -> None:
    """Write the source SOURCE.md unchanged, followed by the "Bundled subset" section."""
    original = (src_dir / "SOURCE.md").read_text(encoding="utf-8").rstrip("\n")
    intro = (
        "The sections above describe the subset in the project's full data folder. This folder is a copy of\n"
        "it made by `scripts/make_sample_data.py`, with the changes below."
    )
    text = f"{original}\n\n## Bundled subset\n\n{intro}\n\n{bundled_section.strip()}\n"
    (out_dir / "SOURCE.md").write_text(text, encoding="utf-8")


RESIZE_NOTE = f"""
Images were downscaled from the files of the full subset: shorter side scaled to {SHORT_SIDE} px with
Pillow's bicubic filter, aspect ratio kept, saved as baseline JPEG (quality {JPEG_QUALITY}, 4:2:0 chroma
subsampling, optimized Huffman tables, no EXIF or ICC data). Those files were JPEGs already, so these images
went through lossy compression at least twice.
"""
SAMPLING_NOTE = """
Sampling is deterministic and uses no random numbers: for each class, the first {n} images in sorted
`filepath` order of the full subset's `labels.csv` were kept. Rows keep the order of that file.
"""


# ---------------------------------------------------------------------------------------------------------
# Flickr8k


def build_flickr8k(source: Path, out: Path) -> None:
    src_dir, out_dir = source / "flickr8k", out / "flickr8k"
    caption_fields, captions = read_csv(src_dir / "captions.csv")
    split_fields, splits = read_csv(src_dir / "splits.csv")
    split_of = {row["filepath"]: row["split"] for row in splits}
    unsplit = {row["filepath"] for row in captions} - split_of.keys()
    if unsplit:
        raise ValueError(
            f"{src_dir / 'splits.csv'} has no row for {len(unsplit)} captioned images, for example {min(unsplit)}"
        )

    image_paths = sorted(split_of)
    for rel_path in image_paths:
        downscale_image(src_dir / rel_path, out_dir / rel_path)
    LOG.info("flickr8k: wrote %d images", len(image_paths))

    write_csv(out_dir / "captions.csv", caption_fields, captions)
    write_csv(out_dir / "splits.csv", split_fields, splits)

    split_counts = {}
    for split in FLICKR_SPLITS:
        split_rows = [row for row in captions if split_of[row["filepath"]] == split]
        write_csv(out_dir / f"{split}.csv", caption_fields, split_rows)
        split_counts[split] = (len({row["filepath"] for row in split_rows}), len(split_rows))
        LOG.info("flickr8k: %s.csv has %d images, %d captions", split, *split_counts[split])

    pair_rows = make_caption_pairs([row for row in captions if split_of[row["filepath"]] == "train"])
    write_csv(out_dir / "train_pairs.csv", ["filepath", "caption", "caption2"], pair_rows)
    LOG.info("flickr8k: train_pairs.csv has %d rows", len(pair_rows))

    none_count = sum(1 for split in split_of.values() if split not in FLICKR_SPLITS)
    train_rows, dev_rows, test_rows = (split_counts[split][1] for split in FLICKR_SPLITS)
    image_counts = " / ".join(str(split_counts[split][0]) for split in FLICKR_SPLITS)
    bundled = f"""
All {len(image_paths)} images and all {len(captions)} captions of the full subset are kept, so the official
train / dev / test splits of these images are complete: {image_counts} images,
and {none_count} images are in no split.
{RESIZE_NOTE}
Captions are unchanged. Files in this folder (paths relative to this folder):

```
flickr8k/
  captions.csv     columns: filepath,caption            ({len(captions)} rows, all images)
  splits.csv       columns: filepath,split              ({len(splits)} rows; train|dev|test|none)
  train.csv        columns: filepath,caption            ({train_rows} rows, train images only)
  dev.csv          columns: filepath,caption            ({dev_rows} rows, dev images only)
  test.csv         columns: filepath,caption            ({test_rows} rows, test images only)
  train_pairs.csv  columns: filepath,caption,caption2   ({len(pair_rows)} rows, train images only)
  images/<flickr_id>.jpg
```

`train.csv`, `dev.csv` and `test.csv` hold the rows of `captions.csv` whose image is in that split, in the same
order. `train_pairs.csv` has one row per training caption, for methods that need two captions of one image
(for example ALIP): `caption2` is the next caption of the same image in `captions.csv` order, and the last
caption of an image is paired with its first one.
"""
    write_source_md(src_dir, out_dir, bundled)


def make_caption_pairs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Pair each caption with the next caption of the same image, wrapping around to the image's first."""
    captions_of: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        captions_of[row["filepath"]].append(row["caption"])

    pairs = []
    seen: dict[str, int] = defaultdict(int)
    for row in rows:
        image_captions = captions_of[row["filepath"]]
        index = seen[row["filepath"]]
        seen[row["filepath"]] += 1
        next_caption = image_captions[(index + 1) % len(image_captions)]
        pairs.append({"filepath": row["filepath"], "caption": row["caption"], "caption2": next_caption})
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Labelled classification subsets


def build_cifar10(source: Path, out: Path) -> None:
    src_dir, out_dir = source / "cifar10", out / "cifar10"
    fields, rows = read_csv(src_dir / "labels.csv")
    selected = first_per_class(rows, CIFAR10_PER_CLASS_AND_SPLIT, key=lambda row: (row["split"], row["label"]))
    for row in selected:
        copy_file(src_dir / row["filepath"], out_dir / row["filepath"])

    train_rows = [row for row in selected if row["split"] == "train"]
    test_rows = [row for row in selected if row["split"] == "test"]
    write_csv(out_dir / "labels.csv", fields, test_rows)
    write_csv(out_dir / "test.csv", fields, test_rows)
    write_csv(out_dir / "train.csv", fields, train_rows)
    copy_file(src_dir / "classnames.txt", out_dir / "classnames.txt")
    LOG.info("cifar10: wrote %d train and %d test images", len(train_rows), len(test_rows))

    per_class = CIFAR10_PER_CLASS_AND_SPLIT
    bundled = f"""
{len(selected)} images: {per_class} per class from the train split and {per_class} per class from the test split.
Sampling is deterministic and uses no random numbers: for each (split, class), the first {per_class} images
in sorted `filepath` order of the full subset's `labels.csv` were kept. Rows keep the order of that file.
Image files are copied byte for byte (32×32 JPEG, as stored by the source).

```
cifar10/
  labels.csv       columns: filepath,label,class_name,split   ({len(test_rows)} rows, test split only)
  test.csv         same rows as labels.csv
  train.csv        columns: filepath,label,class_name,split   ({len(train_rows)} rows, train split only)
  classnames.txt   10 lines, line i = name of label i
  train/<class>/NNNN.jpg
  test/<class>/NNNN.jpg
```
"""
    write_source_md(src_dir, out_dir, bundled)


def build_labelled(source: Path, out: Path, subset: LabelledSubset) -> None:
    src_dir, out_dir = source / subset.name, out / subset.name
    fields, rows = read_csv(src_dir / "labels.csv")
    selected = first_per_class(rows, subset.per_class, key=lambda row: row["label"])

    for row in selected:
        if subset.resize:
            width, height = downscale_image(src_dir / row["filepath"], out_dir / row["filepath"])
            if "size" in row:
                row["size"] = f"{width}x{height}"
        else:
            copy_file(src_dir / row["filepath"], out_dir / row["filepath"])

    write_csv(out_dir / "labels.csv", fields, selected)
    copy_file(src_dir / "classnames.txt", out_dir / "classnames.txt")
    for name in subset.extra_files:
        if (src_dir / name).is_file():
            copy_file(src_dir / name, out_dir / name)

    class_count = len({row["label"] for row in selected})
    LOG.info("%s: wrote %d images of %d classes", subset.name, len(selected), class_count)
    write_source_md(src_dir, out_dir, describe_labelled(subset, fields, len(selected), class_count))


def describe_labelled(subset: LabelledSubset, fields: list[str], image_count: int, class_count: int) -> str:
    if subset.per_class is None:
        sampling = "All images of the full subset are kept."
    else:
        sampling = SAMPLING_NOTE.format(n=subset.per_class)
    processing = RESIZE_NOTE if subset.resize else "Image files are copied byte for byte."

    lines = [
        f"{image_count} images of {class_count} classes.",
        sampling.strip(),
        "",
        processing.strip(),
        "",
        f"`labels.csv` keeps the source columns ({','.join(fields)}); `classnames.txt` is copied unchanged.",
    ]
    if "size" in fields:
        lines.append("The `size` column gives the size of the bundled (downscaled) image.")
    if subset.extra_files:
        lines.append(f"Also copied unchanged: {', '.join(f'`{name}`' for name in subset.extra_files)}.")
    return "\n".join(lines)


def build_clip_prompts(source: Path, out: Path) -> None:
    src_dir, out_dir = source / "clip_prompts", out / "clip_prompts"
    copy_file(src_dir / "prompts.json", out_dir / "prompts.json")
    dataset_count = len(json.loads((out_dir / "prompts.json").read_text(encoding="utf-8")))
    LOG.info("clip_prompts: copied prompts.json (%d datasets)", dataset_count)
    write_source_md(src_dir, out_dir, "`prompts.json` is copied byte for byte.")


# ---------------------------------------------------------------------------------------------------------
# README and checks


README_ROWS = {
    # folder: (content, terms)
    "flickr8k": ("Flickr8k photos with 5 human captions each; official train/dev/test split", "research use only"),
    "cifar10": (
        "CIFAR-10, 50 train + 50 test images per class, 32×32 JPEG as stored by the source",
        "no formal license; research",
    ),
    "cifar100": ("CIFAR-100 test images, 32×32 PNG (from the foolbox wheel)", "foolbox MIT; CIFAR research"),
    "gtsrb": ("GTSRB official test split, 32×32 PNG (resized by the source)", "research use (INI, RUB)"),
    "svhn": ("SVHN cropped digits, 32×32 PNG (from the ccexam wheel)", "ccexam MIT; SVHN non-commercial"),
    "flowers102": ("Oxford Flowers-102, shorter side 128 px JPEG", "research use (VGG Oxford)"),
    "dtd": ("Describable Textures, 10 of 47 classes, shorter side 128 px JPEG", "research use only"),
    "cub200": ("CUB-200-2011, 100 of 200 classes, 128×128 JPEG", "non-commercial research"),
    "clip_prompts": ("CLIP class names and prompt templates (text only)", "MIT (openai/CLIP)"),
}


def count_summary(out: Path, folder: str) -> str:
    """Describe the images (and pairs or classes) in one output folder for the README table."""
    folder_path = out / folder
    if folder == "clip_prompts":
        prompts = json.loads((folder_path / "prompts.json").read_text(encoding="utf-8"))
        return f"class lists and templates for {len(prompts)} datasets"

    images = count_images(folder_path)
    if folder == "flickr8k":
        _, captions = read_csv(folder_path / "captions.csv")
        return f"{images} images, {len(captions)} pairs"

    classnames = (folder_path / "classnames.txt").read_text(encoding="utf-8").splitlines()
    label_of = {}
    for csv_path in sorted(folder_path.glob("*.csv")):
        for row in read_csv(csv_path)[1]:
            label_of[row["filepath"]] = row["label"]
    per_class = sorted(Counter(label_of.values()).values())
    per_class_text = str(per_class[0]) if per_class[0] == per_class[-1] else f"{per_class[0]}–{per_class[-1]}"
    return f"{images} images; {len(per_class)} / {len(classnames)} classes; {per_class_text} per class"


def write_readme(out: Path) -> int:
    rows = []
    total = 0
    for folder in OUTPUT_FOLDERS:
        size = folder_bytes(out / folder)
        total += size
        content, terms = README_ROWS[folder]
        rows.append(f"| `{folder}/` | {content} | {count_summary(out, folder)} | {size / 2**20:.2f} MiB | {terms} |")
    table = "\n".join(rows)

    text = f"""# Bundled sample data

Small subsets of **real** public datasets that ship inside the `dinorankclip` package, so the demo and the
test suite run on a fresh clone without the full data folder and without network access. Nothing here is
synthetic. Every folder has a `SOURCE.md` with the dataset's origin (repository and commit, or package and
version), its license or terms, and a "Bundled subset" section that says what was sampled and how the images
were processed.

| folder | content | counts | size | terms |
|---|---|---|---|---|
{table}

Total: {total / 2**20:.2f} MiB ({total} bytes, without this README).

All paths inside CSV files are relative to the folder that contains the CSV. Labelled folders have `labels.csv`
(at least `filepath,label,class_name`; integer `label` = official class index) and `classnames.txt` (line *i*
= name of label *i*, full class list even where only some classes have images). `flickr8k/` has
`captions.csv` (`filepath,caption`), `splits.csv` (`filepath,split`), per-split `train.csv`, `dev.csv`,
`test.csv` and `train_pairs.csv` (`filepath,caption,caption2`).

## Caveats

- These datasets are licensed for research or non-commercial use only. They are kept here for the project's
  tests and demo; do not redistribute them separately or use them commercially.
- Many images were downscaled and re-encoded (see each `SOURCE.md`), and the subsets are tiny, so accuracy or
  recall measured on them is a smoke test, not comparable with published benchmark numbers.

## Rebuilding

`scripts/make_sample_data.py --source DIR` rebuilds this folder from the full data folder. The sampling
uses no random numbers, and a rebuild with the same Pillow build gives byte-identical files.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
    return total


def check_sizes(out: Path) -> None:
    """Raise ValueError when a file or the whole folder exceeds the size limits for package data."""
    too_large = [path for path in out.rglob("*") if path.is_file() and path.stat().st_size > MAX_FILE_BYTES]
    if too_large:
        raise ValueError(
            f"files larger than {MAX_FILE_BYTES} bytes: {[str(path) for path in too_large]}; "
            f"split them or store fewer rows or images in them"
        )
    total = folder_bytes(out)
    if total > MAX_TOTAL_BYTES:
        raise ValueError(
            f"{out} contains {total} bytes, which exceeds the limit of {MAX_TOTAL_BYTES} bytes; "
            f"lower JPEG_QUALITY or the per-class counts"
        )


# ---------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help=f"full real-data folder with flickr8k/, cifar10/, ... (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output folder, whose dataset subfolders and README.md are replaced (default: {DEFAULT_OUT})",
    )
    return parser.parse_args(argv)


def validate_paths(source: Path, out: Path) -> None:
    missing = [name for name in OUTPUT_FOLDERS if not (source / name / "SOURCE.md").is_file()]
    if missing:
        raise FileNotFoundError(
            f"source folder {source} is missing {', '.join(missing)} (or their SOURCE.md); pass the full data folder "
            f"with --source"
        )
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} must not be the source folder {source} or inside it")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    source, out = args.source, args.out
    validate_paths(source, out)

    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FOLDERS:
        if (out / name).exists():
            LOG.info("removing old %s", out / name)
            shutil.rmtree(out / name)
    (out / "README.md").unlink(missing_ok=True)

    LOG.info("building sample data from %s into %s", source, out)
    build_flickr8k(source, out)
    build_cifar10(source, out)
    for subset in LABELLED_SUBSETS:
        build_labelled(source, out, subset)
    build_clip_prompts(source, out)

    total = write_readme(out)
    check_sizes(out)
    LOG.info("done: %d bytes (%.2f MiB) in %s", total, total / 2**20, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
