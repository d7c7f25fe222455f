"""Training-data throughput: our CSV and WebDataset pipelines against open_clip's CSV pipeline.

All three produce the same training input from the same table: a random resized crop (scale 0.9-1.0,
bicubic), normalised with CLIP's mean and std, and the tokens of the caption. open_clip's pipeline is
``open_clip_train.data.get_csv_dataset`` (open_clip_torch 3.3.0) with ``open_clip.image_transform``;
ours are ``build_train_data`` on the table and on shards packed from it (packing is not timed). Our
loaders return uint8 images that the trainer normalises on its device. Here the main process
normalises each batch on the CPU inside the timed loop, so all three deliver float32 batches.

Pipelines run in interleaved rounds (A, B, C, A, B, C, ...) so that load from other processes affects
them alike; each round skips ``--warmup`` batches (worker start-up) and times ``--batches`` batches.
The script prints the median images per second of every pipeline and the ratios to open_clip.

Usage::

    PYTHONPATH=src python benchmarks/data_bench.py [--csv TABLE] [--image-size 224] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip_train.data import get_csv_dataset

from dinorankclip.config import DataConfig
from dinorankclip.data.loader import build_train_data
from dinorankclip.data.pack import pack_shards
from dinorankclip.data.transforms import PairedViews, normalize_images

REPO = Path(__file__).resolve().parents[1]
SHARED_FLICKR = REPO.parent / "shared" / "data" / "flickr8k" / "captions.csv"
BUNDLED_FLICKR = REPO / "src" / "dinorankclip" / "sample_data" / "flickr8k" / "train.csv"


def _absolute_table(table: Path, out: Path, rows: int) -> Path:
    """Copy ``rows`` rows of a filepath,caption table with absolute paths (open_clip reads paths as given)."""
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        pairs = [(str((table.parent / r["filepath"]).resolve()), r["caption"]) for r in reader][:rows]
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "caption"])
        writer.writerows(pairs)
    return out


def _open_clip_loader(table: Path, args, tokenizer):
    transform = open_clip.image_transform(args.image_size, is_train=True, mean=OPENAI_DATASET_MEAN,
                                          std=OPENAI_DATASET_STD)
    params = SimpleNamespace(train_data=str(table), val_data=None, csv_img_key="filepath", csv_caption_key="caption",
                             csv_separator="\t", batch_size=args.batch_size, workers=args.workers, distributed=False)
    info = get_csv_dataset(params, transform, is_train=True, tokenizer=tokenizer)
    info.dataloader.pin_memory = False  # no GPU here; pinning would only warn
    return iter(info.dataloader), lambda batch: batch[0]


def _our_loader(train: str, args, tokenizer):
    views = PairedViews(image_size=args.image_size, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                        teacher_size=args.teacher_size, train=True, output_uint8=True)
    cfg = DataConfig(train=train, num_workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    loader = build_train_data(cfg, transform=views, tokenizer=tokenizer, batch_size=args.batch_size, seed=0)
    return loader, lambda batch: normalize_images(batch["image"], OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def _images_per_second(make_loader, args) -> float:
    loader, finish = make_loader()
    for _ in range(args.warmup):
        finish(next(loader))
    start = time.perf_counter()
    for _ in range(args.batches):
        images = finish(next(loader))
    elapsed = time.perf_counter() - start
    assert images.dtype == torch.float32, images.dtype
    assert images.shape[-1] == args.image_size, images.shape
    if hasattr(loader, "close"):
        loader.close()
    del loader
    return args.batches * args.batch_size / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, help="filepath,caption table (default: the shared Flickr8k captions "
                                                  "if present, else the bundled Flickr8k training split)")
    parser.add_argument("--rows", type=int, default=2000, help="table rows used (default 2000)")
    parser.add_argument("--image-size", type=int, default=224, help="trunk input size in pixels (default 224)")
    parser.add_argument("--teacher-size", type=int, default=None,
                        help="also produce a teacher view of this size in our pipelines (default: none, as open_clip)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="our shard shuffle buffer (default 1000)")
    args = parser.parse_args(argv)

    table = args.csv or (SHARED_FLICKR if SHARED_FLICKR.is_file() else BUNDLED_FLICKR)
    torch.set_num_threads(1)  # the main process only collates and normalises; workers use one thread each
    tokenizer = open_clip.get_tokenizer("RN50")
    with tempfile.TemporaryDirectory() as tmp:
        absolute = _absolute_table(table, Path(tmp) / "pairs.tsv", args.rows)
        packed = pack_shards(absolute, Path(tmp) / "shards", shard_size=max(1, args.rows // (2 * args.workers)))
        pipelines = {
            "open_clip CSV": lambda: _open_clip_loader(absolute, args, tokenizer),
            "ours CSV": lambda: _our_loader(str(absolute), args, tokenizer),
            "ours shards": lambda: _our_loader(packed.pattern, args, tokenizer),
        }
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, make in pipelines.items():
                rates[name].append(_images_per_second(make, args))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["open_clip CSV"]
    print(f"data: {table} ({args.rows} rows), image size {args.image_size}, teacher view "
          f"{args.teacher_size or 'none'}, batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds of {args.batches} batches")
    print(f"{'pipeline':<16}{'images/s (median)':>20}{'rounds':>30}{'vs open_clip':>14}")
    for name, value in medians.items():
        rounds = ", ".join(f"{v:.0f}" for v in rates[name])
        print(f"{name:<16}{value:>20.1f}{rounds:>30}{value / base:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
