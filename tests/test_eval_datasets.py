"""Evaluation datasets by layout: CSV, image folders, the ImageNet family, CUB, WebDataset, Karpathy JSON."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from table_helpers import read_rows

from dinorankclip.config import ConfigError, EvalConfig, load_config
from dinorankclip.data.csv_dataset import collate_samples
from dinorankclip.eval.captions import open_captions
from dinorankclip.eval.datasets import open_labelled
from dinorankclip.eval.folders import imagenet_synsets
from dinorankclip.eval.runner import evaluate, run_retrieval, run_zeroshot


def _cifar_images(sample_data: Path, per_class: int, classes=("airplane", "cat", "ship")) -> dict[str, list[Path]]:
    rows = read_rows(sample_data / "cifar10" / "test.csv")
    out: dict[str, list[Path]] = {c: [] for c in classes}
    for row in rows:
        if row["class_name"] in out and len(out[row["class_name"]]) < per_class:
            out[row["class_name"]].append(sample_data / "cifar10" / row["filepath"])
    return out


def _image_folder(root: Path, images: dict[str, list[Path]]) -> Path:
    for folder, files in images.items():
        (root / folder).mkdir(parents=True)
        for file in files:
            shutil.copy(file, root / folder / file.name)
    return root


def test_csv_split_column_filters_rows(tmp_path, sample_data, encoder, transform):
    cifar = sample_data / "cifar10"
    rows = read_rows(cifar / "train.csv")[::50] + read_rows(cifar / "test.csv")[::50]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "label", "split"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"filepath": str(sample_data / "cifar10" / row["filepath"]), "label": row["label"],
                             "split": row["split"]})
    shutil.copy(sample_data / "cifar10" / "classnames.txt", tmp_path / "classnames.txt")
    metrics = run_zeroshot(encoder, "cifar10", table, transform=transform, split="test")
    assert metrics["num_images"] == 10
    assert metrics["layout"] == "csv"
    assert metrics["acc1"] == metrics["top1"]
    with pytest.raises(ValueError, match="no rows of split 'val'"):
        run_zeroshot(encoder, "cifar10", table, transform=transform, split="val")


def test_zeroshot_on_image_folder(tmp_path, sample_data, encoder, transform):
    root = _image_folder(tmp_path / "folder", _cifar_images(sample_data, per_class=4))
    metrics = run_zeroshot(encoder, "my_objects", root, transform=transform)
    assert metrics["layout"] == "image_folder"
    assert metrics["num_images"] == 12
    assert metrics["num_classes"] == 3
    assert metrics["classnames"] == "folder names"
    assert metrics["templates"] == "builtin"
    assert 0.0 <= metrics["top1"] <= 1.0
    assert metrics["chance_top1"] == pytest.approx(1 / 3)


def test_shared_class_name_keeps_three_rows(tmp_path, sample_data, encoder, transform, caplog):
    root = _image_folder(tmp_path / "folder", _cifar_images(sample_data, per_class=2))
    (root / "classnames.txt").write_text("vehicle\nanimal\nvehicle\n")
    labelled = open_labelled("shared_names", root, transform=transform)
    assert labelled.classnames == ["vehicle", "animal", "vehicle"]
    metrics = run_zeroshot(encoder, "shared_names", root, transform=transform)
    assert metrics["num_classes"] == 3
    assert metrics["duplicate_classnames"] == {"vehicle": [0, 2]}
    assert "shared by labels [0, 2]" in caplog.text


def test_template_precedence_recorded(tmp_path, sample_data, encoder, transform):
    root = _image_folder(tmp_path / "folder", _cifar_images(sample_data, per_class=1))
    user = tmp_path / "templates.txt"
    user.write_text("a drawing of a {c}.\n")
    as_user = run_zeroshot(encoder, "cifar10_folder", root, transform=transform, templates_file=str(user))
    assert (as_user["templates"], as_user["template_origin"], as_user["num_templates"]) == ("user", str(user), 1)
    as_builtin = run_zeroshot(encoder, "cifar10_folder", root, transform=transform)
    assert as_builtin["templates"] == "builtin"
    table = sample_data / "dtd" / "labels.csv"
    as_dataset = run_zeroshot(encoder, "dtd", table, transform=transform)
    assert as_dataset["templates"] == "dataset"
    assert as_dataset["template_origin"] == "prompts.json:DescribableTextures"


def test_numeric_class_folders_sort_as_numbers(tmp_path, sample_data, transform):
    images = _cifar_images(sample_data, per_class=1)
    root = _image_folder(tmp_path / "v2", dict(zip(["10", "2", "0"], images.values(), strict=True)))
    labelled = open_labelled("imagenetv2", root, transform=transform)
    assert len(labelled.classnames) == 1000
    assert sorted(labelled.dataset.labels) == [0, 2, 10]


def test_imagenet_r_subset_classifier(tmp_path, sample_data, transform):
    synsets = imagenet_synsets()
    images = _cifar_images(sample_data, per_class=1)
    folders = dict(zip([synsets[1], synsets[7]], list(images.values())[:2], strict=True))
    root = _image_folder(tmp_path / "imagenet-r", folders)
    labelled = open_labelled("imagenet-r", root, transform=transform)
    full = open_labelled("imagenet", root, transform=transform)
    assert len(labelled.classnames) == 2
    assert labelled.classnames == [full.classnames[1], full.classnames[7]]
    assert sorted(labelled.dataset.labels) == [0, 1]
    assert sorted(full.dataset.labels) == [1, 7]


def test_cub_official_layout(tmp_path, sample_data, transform):
    rows = read_rows(sample_data / "cub200" / "labels.csv")[:6]
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    official = (sample_data / "cub200" / "classes_official.txt").read_text().splitlines()
    (root / "classes.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(official)))
    images, labels, splits = [], [], []
    for i, row in enumerate(rows, start=1):
        rel = Path(row["filepath"]).relative_to("images")
        (root / "images" / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_data / "cub200" / row["filepath"], root / "images" / rel)
        images.append(f"{i} {rel.as_posix()}\n")
        labels.append(f"{i} {int(row['label']) + 1}\n")
        splits.append(f"{i} {i % 2}\n")
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(labels))
    (root / "train_test_split.txt").write_text("".join(splits))
    train = open_labelled("cub", tmp_path, split="train", transform=transform)
    test = open_labelled("cub200", root, split="test", transform=transform)
    assert (train.layout, len(train.dataset), len(test.dataset)) == ("cub", 3, 3)
    assert train.classnames[0] == "Black footed Albatross"
    assert len(train.classnames) == 200
    assert train.dataset.labels == [int(r["label"]) for r in rows[0::2]]


def test_webdataset_layout(tmp_path, sample_data, encoder, transform):
    import webdataset as wds

    rows = read_rows(sample_data / "dtd" / "labels.csv")[::10]
    root = tmp_path / "wds_dtd"
    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        for i, row in enumerate(rows):
            sink.write({"__key__": f"s{i:04d}", "jpg": (sample_data / "dtd" / row["filepath"]).read_bytes(),
                        "cls": row["label"].encode()})
    (root / "test" / "nshards.txt").write_text("1\n")
    shutil.copy(sample_data / "dtd" / "classnames.txt", root / "classnames.txt")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c} texture.\n{c} pattern.\n")
    metrics = run_zeroshot(encoder, "wds/dtd", root, transform=transform)
    assert metrics["layout"] == "wds"
    assert metrics["num_images"] == len(rows)
    assert (metrics["templates"], metrics["num_templates"]) == ("dataset", 2)
    assert metrics["template_origin"].endswith("zeroshot_classification_templates.txt")
    with pytest.raises(FileNotFoundError, match="train/nshards.txt"):
        open_labelled("wds/dtd", root, split="train", transform=transform)


def test_torchvision_root_missing_names_layout(tmp_path, transform):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        open_labelled("cifar10", tmp_path / "absent", transform=transform)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="fgvc-aircraft-2013b"):
        open_labelled("aircraft", tmp_path / "empty", transform=transform)
    with pytest.raises(ValueError, match="allowed splits: train, test"):
        open_labelled("stanford_cars", tmp_path / "empty", split="val", transform=transform)


def _karpathy(tmp_path: Path, sample_data: Path, num_images: int) -> Path:
    rows = read_rows(sample_data / "flickr8k" / "test.csv")
    by_image: dict[str, list[str]] = {}
    for row in rows:
        by_image.setdefault(row["filepath"], []).append(row["caption"])
    images = []
    for i, (file, captions) in enumerate(list(by_image.items())[:num_images]):
        images.append({"filename": Path(file).name, "filepath": "images", "split": "test" if i % 4 else "val",
                       "sentences": [{"raw": c} for c in captions]})
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def test_karpathy_json_retrieval(tmp_path, sample_data, encoder, transform):
    path = _karpathy(tmp_path, sample_data, num_images=12)
    metrics = run_retrieval(encoder, path, transform=transform, split="test",
                            image_root=str(sample_data / "flickr8k"))
    assert (metrics["split"], metrics["num_images"], metrics["num_texts"]) == ("test", 9, 45)
    assert metrics["image_retrieval_recall@5"] == metrics["text_to_image"]["R@5"]
    assert metrics["text_retrieval_recall@5"] == metrics["image_to_text"]["R@5"]
    assert metrics["num_images_skipped"] == 0
    with pytest.raises(ValueError, match="splits in the file: test, val"):
        open_captions(path, split="train", transform=transform)


def test_retrieval_any_caption_end_to_end(tmp_path, sample_data, encoder, transform):
    """With a caption CSV, image-to-text R@K equals the share of images with any own caption in the top K."""
    metrics = run_retrieval(encoder, sample_data / "flickr8k" / "test.csv", transform=transform)
    data = open_captions(sample_data / "flickr8k" / "test.csv", transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=256, collate_fn=collate_samples)
    image = encoder.images(loader)["image_features"]
    text = encoder.texts(data.texts)
    top5 = (image @ text.T).topk(5, dim=1).indices  # [I, 5]
    expected = (data.text_to_image[top5] == torch.arange(len(data))[:, None]).any(dim=1).float().mean().item()
    assert metrics["image_to_text"]["R@5"] == pytest.approx(expected)


def test_evaluate_task_subset_and_skips(sample_data, encoder):
    cfg = EvalConfig(zeroshot={"dtd": str(sample_data / "dtd" / "labels.csv")},
                     retrieval=str(sample_data / "flickr8k" / "test.csv"), batch_size=128)
    records = evaluate(encoder, cfg, model_name="tiny", tasks=["zeroshot", "probe"],
                       skipped={("probe", "cars"): "not bundled", ("retrieval", "coco"): "absent"})
    assert [(r["task"], r["dataset"]) for r in records] == [("zeroshot_classification", "dtd"),
                                                             ("linear_probe", "stanford_cars")]
    assert records[1]["skipped"] == "not bundled"
    assert records[1]["metrics"] == {}
    assert set(records[0]) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    with pytest.raises(ValueError, match="unknown evaluation task 'linear'"):
        evaluate(encoder, cfg, model_name="tiny", tasks=["linear"])


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="eval.probe_val_fraction"):
        EvalConfig(probe_val_fraction=1.0)
    with pytest.raises(ConfigError, match="eval.probe_c_values"):
        EvalConfig(probe_c_values=[])
    with pytest.raises(ConfigError, match="eval.probe_features"):
        EvalConfig(probe_features="student_global")
    cfg = load_config(None, ["eval.probe.cub200=/data/cub", "eval.probe_c_values=[0.1, 1]"])
    assert cfg.eval.probe == {"cub200": "/data/cub"}
    assert cfg.eval.probe_c_values == [0.1, 1.0]

