"""Training loaders: full batches despite bad rows, the bad-sample log and counters, source detection."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from train_helpers import one_thread, write_tar  # noqa: F401

from dinorankclip.config import DataConfig
from dinorankclip.data import wds
from dinorankclip.data.counters import BadDataError, DataCounters
from dinorankclip.data.csv_dataset import BadSample
from dinorankclip.data.loader import build_train_data
from dinorankclip.data.transforms import PairedViews

VIEWS = PairedViews(image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, output_uint8=True)


def _tokenizer(texts):
    return torch.tensor([[len(t), 1] for t in texts])


@pytest.fixture
def table_with_bad_rows(tmp_path, sample_data):
    images = sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[:5]
    rows = []
    for i, image in enumerate(images):
        shutil.copy(image, tmp_path / f"good{i}.jpg")
        rows.append(f"good{i}.jpg,caption {i}")
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows += ["empty.jpg,empty image", "missing.jpg,missing image", "empty.jpg,empty again"]
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_table_batches_stay_full(table_with_bad_rows):
    cfg = DataConfig(train=str(table_with_bad_rows), num_workers=0)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=0)
    batches = [next(loader) for _ in range(4)]  # two epochs of 8 rows
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
    bad = [s for b in batches for s in b["bad"]]
    assert {s.kind for s in bad} == {"empty_image", "missing_file"}
    assert sum(b["num_samples"] for b in batches) == 16 + len(bad)
    again = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=0)
    assert [next(again)["key"] for _ in range(4)] == [b["key"] for b in batches]  # replacements are seeded


def test_counters_log_then_summarise(caplog):
    counters = DataCounters(1.0, log_limit=2, log_interval=0.0)
    batch = {"num_samples": 5, "bad": [BadSample(-1, "s.tar", "no caption", "missing_caption", f"k{i}")
                                       for i in range(5)]}
    with caplog.at_level(logging.WARNING, logger="dinorankclip.data.counters"):
        counters.update(batch)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Skipped sample (missing_caption) in s.tar key" in m for m in messages) == 2
    assert any("more samples skipped" in m for m in messages)
    assert counters.metrics() == {"samples_seen": 5, "samples_skipped": 5, "skipped_missing_caption": 5}


def test_counters_stop_on_summed_counts():
    counters = DataCounters(0.1, min_samples=10)
    counts = torch.zeros(2 + len(counters.by_kind), dtype=torch.int64)
    counts[0], counts[1] = 20, 3  # as summed over processes
    with pytest.raises(BadDataError, match="3 of 20 samples"):
        counters.apply(counts)


@pytest.mark.parametrize(
    "train, fmt, expected",
    [("pairs.csv", "auto", False), ("d/shard-{000..009}.tar", "auto", True), ("a.tar::b.tar", "auto", True),
     ("pairs.tsv", "webdataset", True), ("x.tar", "csv", False)],
)
def test_source_detection(train, fmt, expected):
    assert DataConfig(train=train, format=fmt).is_webdataset is expected


def test_worker_stops_on_endless_bad_samples(tmp_path, monkeypatch):
    members = []
    for i in range(6):
        members += [(f"x{i}.jpg", b"not a jpeg"), (f"x{i}.txt", b"caption")]
    write_tar(tmp_path / "broken.tar", members)
    monkeypatch.setattr(wds, "MAX_BAD_IN_A_ROW", 4)
    cfg = DataConfig(train=str(tmp_path / "broken.tar"), num_workers=0, shuffle_buffer=0)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=2, seed=0)
    with pytest.raises(BadDataError, match="4 unreadable samples in a row"):
        next(loader)
