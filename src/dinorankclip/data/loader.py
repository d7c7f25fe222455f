"""Training and evaluation data loaders.

Training batches from a table come from :class:`ResumableBatchSampler`: an endless sequence of epochs,
each a permutation drawn from ``(seed, epoch)``. The position in that sequence is one integer (batches
consumed), so a run resumes on exactly the batch it would have seen next. Each sample also gets its own
seed for the random crop, so augmentation does not depend on the number of worker processes.
Training batches from WebDataset shards come from ``wds.py``. :func:`build_train_data` picks the
source and returns an endless iterator with ``state_dict()`` (the resume position) and ``close()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig
from .csv_dataset import CaptionDataset, collate_samples
from .shards import CaptionSpec, ShardPlan, expand_shards, shard_sizes
from .wds import SampleDecoder, ShardBatches, ShardLoader

__all__ = ["ResumableBatchSampler", "TableLoader", "build_eval_loader", "build_train_data", "build_train_loader"]

logger = logging.getLogger(__name__)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless shuffled batches of ``(index, sample_seed)`` keys, split across ranks.

    Every rank draws the same global batch of ``batch_size`` samples and keeps its contiguous share, so a
    run on W processes sees exactly the global batches of a single-process run. The last incomplete
    batch of an epoch is dropped.

    Args:
        num_samples: dataset length.
        batch_size: global batch size (divisible by ``world_size``).
        seed: base seed of the shuffles and crops.
        start_batch: global batches already consumed (resume position).
        shuffle: permute each epoch.
        rank, world_size: this process's share of each global batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} is not divisible by the {world_size} processes")
        if num_samples < batch_size:
            raise ValueError(
                f"the training data has {num_samples} samples, fewer than train.batch_size={batch_size}; "
                "lower the batch size or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def position(self, batches_consumed: int) -> tuple[int, int]:
        """Map a count of consumed batches to (epoch, batch within epoch)."""
        return divmod(batches_consumed, self.batches_per_epoch)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.position(self.start_batch)
        local = self.batch_size // self.world_size
        while True:
            order = self._epoch_order(epoch)
            for b in range(batch, self.batches_per_epoch):
                start = b * self.batch_size + self.rank * local
                global_pos = (epoch * self.batches_per_epoch + b) * self.batch_size + self.rank * local
                yield [
                    (int(order[start + i]), (self.seed * 2_000_003 + global_pos + i) % (2**63))
                    for i in range(local)
                ]
            epoch, batch = epoch + 1, 0


def build_train_loader(
    dataset: Dataset, sampler: ResumableBatchSampler, *, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """Wrap ``dataset`` in an endless loader driven by ``sampler``."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def build_eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int) -> DataLoader:
    """Ordered, finite loader over ``dataset``."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_samples
    )


class TableLoader:
    """Endless training batches from a CSV/TSV table, with the resume position.

    Args:
        dataset: the table's :class:`CaptionDataset`.
        sampler: the global-batch sampler (its ``start_batch`` is the resume position).
        num_workers, pin_memory: DataLoader settings.
    """

    def __init__(self, dataset: CaptionDataset, sampler: ResumableBatchSampler, *, num_workers: int,
                 pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batches = sampler.start_batch
        self.num_samples = len(dataset)
        self.batches_per_epoch: int | None = sampler.batches_per_epoch
        self._iterator: Iterator = iter(build_train_loader(dataset, sampler, num_workers=num_workers,
                                                           pin_memory=pin_memory))

    def __iter__(self) -> TableLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        self.batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # The sampler draws global batches, so this position holds for any number of processes.
        return {"kind": "csv", "batches": self.batches}

    def close(self) -> None:
        self._iterator = iter(())


def _shard_states(state: dict[str, Any] | None, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                  plan: ShardPlan, num_samples: int | None) -> tuple[list[dict[str, Any] | None], int]:
    """Return each logical worker's start state and the batches consumed, from a saved loader state."""
    workers = max(1, num_workers)
    if state is None:
        return [None] * workers, 0
    batches = int(state["batches"])
    saved = state.get("workers") or []
    layout = (state.get("kind"), state.get("num_workers"), state.get("world_size", 1))
    if layout == ("webdataset", num_workers, world_size) and len(saved) == workers:
        return list(saved), batches
    # Worker positions cannot be mapped onto a different worker layout: restart at the estimated epoch.
    epoch = batches * batch_size // num_samples if num_samples else 0
    logger.warning(
        "The checkpoint's data position was saved with another data layout (%s data, %s workers per process, %s "
        "processes); restarting the shards at epoch %d, so the data order differs from an uninterrupted run",
        *layout, epoch,
    )
    starts = []
    for logical in range(workers):
        worker = rank * workers + logical
        starts.append({"slot": epoch * plan.slots_per_epoch(worker), "offset": 0, "batches": 0})
    return starts, batches


def build_train_data(
    cfg: DataConfig,
    *,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    state: dict[str, Any] | None = None,
    pin_memory: bool = False,
) -> TableLoader | ShardLoader:
    """Build the endless training-batch iterator of this process.

    Args:
        cfg: data section of the config.
        transform: PairedViews for training.
        tokenizer: the trunk's tokenizer.
        batch_size: global batch size; each process gets ``batch_size // world_size`` samples per batch.
        seed: base seed of shuffles, crops and shard orders.
        rank, world_size: this process's place in the job.
        state: this process's saved ``state_dict()`` to resume from, or None.
        pin_memory: pin batches (CUDA training).

    Returns:
        A :class:`TableLoader` or :class:`ShardLoader`; ``next()`` gives batches of ``batch_size //
        world_size`` good samples, ``state_dict()`` the position after the last batch returned.
    """
    if cfg.train is None:
        raise ValueError("data.train is not set; give a CSV/TSV table or WebDataset shards")
    if batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {world_size} processes")
    draft = getattr(transform, "decode_size", None) if cfg.decode_draft else None
    if not cfg.is_webdataset:
        dataset = CaptionDataset(
            cfg.train, transform=transform, tokenizer=tokenizer, filepath_column=cfg.filepath_column,
            caption_column=cfg.caption_column, second_caption_column=cfg.second_caption_column,
            separator=cfg.separator, exif_transpose=cfg.exif_transpose, decode_draft=cfg.decode_draft,
            replace_bad=True,
        )
        start = int(state["batches"]) if state is not None else 0
        if state is not None and state.get("kind") != "csv":
            logger.warning("The checkpoint's data position comes from %s data; continuing the table at batch %d",
                           state.get("kind"), start)
        sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, start_batch=start, rank=rank,
                                        world_size=world_size)
        return TableLoader(dataset, sampler, num_workers=cfg.num_workers, pin_memory=pin_memory)

    shards = expand_shards(cfg.train)
    num_samples = cfg.num_samples or shard_sizes(shards)
    if num_samples is not None and num_samples < batch_size:
        # The stream never ends, so without this check every batch would repeat samples: false negatives
        # for the contrastive loss. Data of unknown size cannot be checked here.
        source = "data.num_samples" if cfg.num_samples else "sizes.json beside the shards"
        raise ValueError(
            f"the training data has {num_samples} samples ({source}), fewer than train.batch_size={batch_size}; "
            "lower the batch size or add data"
        )
    plan = ShardPlan(shards, seed, world_size * max(1, cfg.num_workers), resampled=cfg.resampled)
    decoder = SampleDecoder(
        transform, tokenizer,
        image_keys=tuple(key.strip().lower() for key in cfg.image_key.split(";") if key.strip()),
        caption=CaptionSpec.parse(cfg.caption_key),
        second_caption=CaptionSpec.parse(cfg.second_caption_key) if cfg.second_caption_key else None,
        exif_transpose=cfg.exif_transpose,
        min_decode_size=draft,
    )
    states, batches = _shard_states(state, batch_size=batch_size, num_workers=cfg.num_workers, rank=rank,
                                    world_size=world_size, plan=plan, num_samples=num_samples)
    workers = max(1, cfg.num_workers)
    dataset = ShardBatches(plan, decoder, rank=rank, num_workers=cfg.num_workers,
                           batch_size=batch_size // world_size, buffer_size=cfg.shuffle_buffer, seed=seed,
                           states=states, rotation=batches % workers)
    loader = ShardLoader(dataset, num_workers=cfg.num_workers, world_size=world_size, batches=batches,
                         pin_memory=pin_memory, num_samples=num_samples,
                         batches_per_epoch=num_samples // batch_size if num_samples else None)
    logger.info("Shards: %d files, %s samples per epoch, %d data workers in the job%s", len(shards),
                num_samples if num_samples else "unknown", plan.num_workers,
                ", resampled" if cfg.resampled else "")
    return loader
