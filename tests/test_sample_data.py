"""Validate the bundled sample data in src/dinorankclip/sample_data with csv and PIL only."""

import csv
import functools
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "src" / "dinorankclip" / "sample_data"

LABELLED_FOLDERS = ("cifar10", "cifar100", "gtsrb", "svhn", "flowers102", "dtd", "cub200")
ALL_FOLDERS = ("flickr8k", "clip_prompts", *LABELLED_FOLDERS)
CSV_FILES = sorted(path.relative_to(SAMPLE_DATA).as_posix() for path in SAMPLE_DATA.rglob("*.csv"))

MAX_TOTAL_BYTES = 15 * 1000 * 1000
MAX_FILE_BYTES = 4 * 1024 * 1024


def read_rows(relative_path: str) -> list[dict[str, str]]:
    with (SAMPLE_DATA / relative_path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_classnames(folder: str) -> list[str]:
    return (SAMPLE_DATA / folder / "classnames.txt").read_text(encoding="utf-8").splitlines()


@functools.cache
def decode_image(path: Path) -> tuple[int, int]:
    """Decode the whole image (not only the header) and return its size."""
    with Image.open(path) as image:
        image.load()
        return image.size


def test_sample_data_folders_present():
    for folder in ALL_FOLDERS:
        assert (SAMPLE_DATA / folder).is_dir(), f"missing folder {folder}"
        assert (SAMPLE_DATA / folder / "SOURCE.md").is_file(), f"{folder} has no SOURCE.md"
        source_text = (SAMPLE_DATA / folder / "SOURCE.md").read_text(encoding="utf-8")
        assert "## Bundled subset" in source_text, f"{folder}/SOURCE.md lacks the 'Bundled subset' section"
    assert (SAMPLE_DATA / "README.md").is_file()


def test_csv_files_found():
    # Guards the parametrized test below against silently running on zero files.
    assert len(CSV_FILES) >= 15, CSV_FILES


@pytest.mark.parametrize("csv_name", CSV_FILES)
def test_csv_rows_point_to_images(csv_name):
    rows = read_rows(csv_name)
    assert rows, f"{csv_name} has no rows"
    folder = (SAMPLE_DATA / csv_name).parent
    for row in rows:
        image_path = folder / row["filepath"]
        assert image_path.is_file(), f"{csv_name}: {row['filepath']} not found"
        width, height = decode_image(image_path)
        assert width > 0, f"{csv_name}: {row['filepath']} has width {width}"
        assert height > 0, f"{csv_name}: {row['filepath']} has height {height}"


@pytest.mark.parametrize("folder", LABELLED_FOLDERS)
def test_labels_within_classnames(folder):
    classnames = read_classnames(folder)
    assert len(classnames) == len(set(classnames)), f"{folder}/classnames.txt has duplicate names"
    label_csvs = [name for name in CSV_FILES if name.startswith(f"{folder}/")]
    assert f"{folder}/labels.csv" in label_csvs
    for csv_name in label_csvs:
        for row in read_rows(csv_name):
            label = int(row["label"])
            assert 0 <= label < len(classnames), f"{csv_name}: label {label} of {row['filepath']} out of range"
            assert row["class_name"] == classnames[label], f"{csv_name}: class_name mismatch for {row['filepath']}"


@pytest.mark.parametrize(("folder", "per_class"), [("gtsrb", 10), ("flowers102", 2), ("dtd", 10), ("cub200", 2)])
def test_labelled_per_class_counts(folder, per_class):
    counts = Counter(row["label"] for row in read_rows(f"{folder}/labels.csv"))
    assert set(counts.values()) == {per_class}, counts


def test_cifar10_train_test_split():
    train_rows = read_rows("cifar10/train.csv")
    test_rows = read_rows("cifar10/test.csv")
    assert read_rows("cifar10/labels.csv") == test_rows
    assert {row["split"] for row in train_rows} == {"train"}
    assert {row["split"] for row in test_rows} == {"test"}
    assert set(Counter(row["label"] for row in train_rows).values()) == {50}
    assert set(Counter(row["label"] for row in test_rows).values()) == {50}
    assert len(Counter(row["label"] for row in test_rows)) == 10


def test_cifar10_images_unchanged_size():
    for row in read_rows("cifar10/labels.csv"):
        assert decode_image(SAMPLE_DATA / "cifar10" / row["filepath"]) == (32, 32), row["filepath"]


def test_downscaled_images_short_side():
    for folder in ("flowers102", "dtd", "cub200"):
        for row in read_rows(f"{folder}/labels.csv"):
            size = decode_image(SAMPLE_DATA / folder / row["filepath"])
            assert min(size) == 128, f"{folder}/{row['filepath']} has size {size}"


def test_flickr8k_test_split_complete():
    test_rows = read_rows("flickr8k/test.csv")
    captions_per_image = Counter(row["filepath"] for row in test_rows)
    assert len(captions_per_image) == 125
    assert set(captions_per_image.values()) == {5}


def test_flickr8k_splits_match_captions():
    split_of = {row["filepath"]: row["split"] for row in read_rows("flickr8k/splits.csv")}
    captions = read_rows("flickr8k/captions.csv")
    assert len(split_of) == 1000
    assert len(captions) == 5000
    assert Counter(split_of.values())["train"] == 753
    for split in ("train", "dev", "test"):
        split_rows = read_rows(f"flickr8k/{split}.csv")
        expected = [row for row in captions if split_of[row["filepath"]] == split]
        assert split_rows == expected, f"flickr8k/{split}.csv differs from the {split} rows of captions.csv"


def test_flickr8k_train_pairs():
    captions_of = defaultdict(list)
    for row in read_rows("flickr8k/train.csv"):
        captions_of[row["filepath"]].append(row["caption"])
    pairs = read_rows("flickr8k/train_pairs.csv")
    assert len(pairs) == sum(len(captions) for captions in captions_of.values())

    position = Counter()
    for row in pairs:
        image_captions = captions_of[row["filepath"]]
        index = position[row["filepath"]]
        position[row["filepath"]] += 1
        assert row["caption"] == image_captions[index]
        assert row["caption2"] == image_captions[(index + 1) % len(image_captions)]


def test_total_size_under_limit():
    sizes = [path.stat().st_size for path in SAMPLE_DATA.rglob("*") if path.is_file()]
    assert sum(sizes) < MAX_TOTAL_BYTES, f"sample data holds {sum(sizes)} bytes"


def test_no_file_over_4mib():
    too_large = [path for path in SAMPLE_DATA.rglob("*") if path.is_file() and path.stat().st_size > MAX_FILE_BYTES]
    assert not too_large, too_large
