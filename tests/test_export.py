"""open_clip export: the folder loads with ``local-dir:`` and gives the trunk's embeddings."""

from __future__ import annotations

import csv
import json
import os
import stat

import open_clip
import pytest
import torch

from dinorankclip.cli.main import main
from dinorankclip.config import load_config
from dinorankclip.data.csv_dataset import collate_samples
from dinorankclip.eval.captions import open_captions
from dinorankclip.eval.export import CONFIG_NAME, WEIGHTS_NAME, export_open_clip
from dinorankclip.eval.runner import eval_views
from dinorankclip.train.checkpoint import load_model
from dinorankclip.train.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_overrides, sample_data):
    out = tmp_path_factory.mktemp("export_run")
    cfg = load_config(None, list(tiny_overrides) + [f"data.train={sample_data / 'flickr8k' / 'train.csv'}",
                                                    f"train.output_dir={out}", "train.steps=2"])
    train(cfg)
    return out


def test_open_clip_round_trip(tmp_path, run_dir, sample_data):
    info = export_open_clip(run_dir, tmp_path / "export")
    assert (tmp_path / "export" / CONFIG_NAME).is_file()
    assert (tmp_path / "export" / WEIGHTS_NAME).is_file()
    assert info["fusion_variant"] == "full"
    assert "Trunk only" in info["note"]

    exported = open_clip.create_model(f"local-dir:{tmp_path / 'export'}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    ours, _ = load_model(run_dir)

    rows = list(csv.DictReader((sample_data / "flickr8k" / "test.csv").open(newline="")))[:20]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "caption"])
        writer.writeheader()
        writer.writerows({"filepath": str(sample_data / "flickr8k" / r["filepath"]), "caption": r["caption"]}
                         for r in rows)
    data = open_captions(pairs, transform=eval_views(ours))
    batch = collate_samples([data[i] for i in range(len(data))])
    with torch.no_grad():
        theirs_image = torch.nn.functional.normalize(exported.encode_image(batch["image"]), dim=-1)
        ours_image = ours.encode_image_all(batch["image"], batch["teacher_view"])
        tokens = tokenizer(data.texts)
        theirs_text = torch.nn.functional.normalize(exported.encode_text(tokens), dim=-1)
        ours_text = ours.encode_text_all(tokens)
    torch.testing.assert_close(theirs_image, ours_image["clip_image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_text, ours_text["clip_text_features"], atol=1e-5, rtol=1e-5)
    assert exported.visual.preprocess_cfg["size"] in (32, (32, 32))


def test_export_cli(tmp_path, run_dir, capsys):
    assert main(["export", "--checkpoint", str(run_dir / "model.safetensors"), "--out", str(tmp_path / "x")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / "x" / CONFIG_NAME).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert set(config["preprocess_cfg"]) >= {"mean", "std"}


def test_export_files_follow_umask(tmp_path, run_dir):
    previous = os.umask(0o022)
    os.umask(previous)
    export_open_clip(run_dir / "model.safetensors", tmp_path / "x")
    for name in (CONFIG_NAME, WEIGHTS_NAME, "dinorankclip_export.json"):
        mode = stat.S_IMODE((tmp_path / "x" / name).stat().st_mode)
        assert mode == 0o666 & ~previous, f"{name}: {oct(mode)}"
