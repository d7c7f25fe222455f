"""Data: tables, image decoding, paired views, bad-sample handling and the resumable sampler."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinorankclip.data.counters import BadDataError, DataCounters
from dinorankclip.data.csv_dataset import BadSample, CaptionDataset, collate_samples, read_table
from dinorankclip.data.images import ImageDecodeError, load_image
from dinorankclip.data.loader import ResumableBatchSampler
from dinorankclip.data.transforms import PairedViews

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _tokenizer(texts):
    return torch.tensor([[len(t), 1] for t in texts])


def _views(train=False):
    return PairedViews(image_size=32, mean=MEAN, std=STD, teacher_size=48, train=train)


def test_missing_column_names_it(sample_data):
    with pytest.raises(ValueError) as err:
        read_table(sample_data / "flickr8k" / "test.csv", ["filepath", "text"],
                   config_keys={"text": "data.caption_column"})
    message = str(err.value)
    assert "'text' is missing" in message
    assert "'caption'" in message  # the columns found are listed
    assert "data.caption_column" in message


def test_table_not_utf8_names_line(tmp_path):
    table = tmp_path / "latin1.csv"
    table.write_bytes(b"filepath,caption\na.jpg,a dog\nb.jpg,caf\xe9 terrace\n")
    with pytest.raises(ValueError) as err:
        read_table(table, ["filepath", "caption"])
    message = str(err.value)
    assert "line 3 is not valid UTF-8" in message
    assert "0xe9" in message
    assert "save it as UTF-8" in message


def test_separator_must_be_one_character(tmp_path, sample_data):
    with pytest.raises(ValueError, match="separator 'ab' is invalid"):
        read_table(sample_data / "flickr8k" / "test.csv", ["filepath"], separator="ab")


def test_missing_table_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_table(tmp_path / "nope.csv", ["filepath"])


def test_tsv_and_custom_columns(tmp_path, sample_data):
    image = sample_data / "flickr8k" / "images"
    first = sorted(image.iterdir())[0]
    shutil.copy(first, tmp_path / "a.jpg")
    (tmp_path / "pairs.tsv").write_text("img\ttext\na.jpg\ta dog\n")
    ds = CaptionDataset(tmp_path / "pairs.tsv", transform=_views(), tokenizer=_tokenizer,
                        filepath_column="img", caption_column="text")
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32)
    assert sample["teacher_view"].shape == (3, 48, 48)
    assert sample["text"].tolist() == [5, 1]


def test_bad_images_skipped_and_counted(tmp_path, sample_data):
    good = sorted((sample_data / "flickr8k" / "images").iterdir())[:2]
    for i, src in enumerate(good):
        shutil.copy(src, tmp_path / f"good{i}.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = good[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.jpg").write_text("not an image")
    rows = ["good0.jpg", "missing.jpg", "empty.jpg", "truncated.jpg", "text.jpg", "good1.jpg"]
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "".join(f"{r},caption {r}\n" for r in rows))
    ds = CaptionDataset(tmp_path / "pairs.csv", transform=_views(), tokenizer=_tokenizer)
    batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch["num_bad"] == 4
    assert batch["image"].shape[0] == 2
    assert batch["index"].tolist() == [0, 5]
    reasons = {b.source.split("/")[-1]: b.reason for b in batch["bad"]}
    assert "not found" in reasons["missing.jpg"]
    assert "empty" in reasons["empty.jpg"]
    assert "cannot decode" in reasons["truncated.jpg"]
    assert "cannot decode" in reasons["text.jpg"]


def test_bad_fraction_stops_run():
    counters = DataCounters(0.25, min_samples=4)
    ok = {"num_samples": 4, "bad": [], "num_bad": 0}
    counters.update(ok)
    bad_batch = {"num_samples": 4, "num_bad": 3, "bad": [BadSample(i, f"f{i}", "x") for i in range(3)]}
    with pytest.raises(BadDataError, match="max_bad_fraction=0.25"):
        counters.update(bad_batch)


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "x.png")


def test_views_share_one_crop(sample_data):
    path = sorted((sample_data / "flickr8k" / "images").iterdir())[3]
    image = load_image(path)
    views = _views(train=True)
    generator = torch.Generator().manual_seed(5)
    out = views(image, generator)
    trunk = out["image"] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    teacher_small = F.interpolate(out["teacher_view"][None], size=32, mode="bilinear", antialias=True)[0]
    # Same crop box, two sizes: the pictures agree up to resampling differences.
    assert (trunk - teacher_small).abs().mean() < 0.03
    again = views(image, torch.Generator().manual_seed(5))
    assert torch.equal(again["image"], out["image"])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    from dinorankclip.data.images import to_rgb

    image = Image.new("RGB", (5, 3), (200, 100, 50)).convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (5, 3)


def test_sampler_resume_matches_continuation():
    full = ResumableBatchSampler(37, 8, seed=3)
    first = list(itertools.islice(iter(full), 10))
    resumed = ResumableBatchSampler(37, 8, seed=3, start_batch=6)
    assert list(itertools.islice(iter(resumed), 4)) == first[6:]
    # Each epoch (4 full batches of 8 from 37) is a permutation without repeats.
    epoch = [i for batch in first[:4] for i, _ in batch]
    assert len(set(epoch)) == 32


def test_sampler_splits_global_batch_across_ranks():
    single = next(iter(ResumableBatchSampler(40, 8, seed=1)))
    parts = [next(iter(ResumableBatchSampler(40, 8, seed=1, rank=r, world_size=2))) for r in range(2)]
    assert parts[0] + parts[1] == single


def test_sampler_rejects_small_data():
    with pytest.raises(ValueError, match="fewer than train.batch_size"):
        ResumableBatchSampler(5, 8)
