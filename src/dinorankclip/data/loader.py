"""Training and evaluation data loaders.

Training batches come from :class:`ResumableBatchSampler`: an endless sequence of epochs, each a
permutation drawn from ``(seed, epoch)``. The position in that sequence is one integer (batches consumed),
so a run resumes on exactly the batch it would have seen next. Each sample also gets its own seed for
the random crop, so augmentation does not depend on the number of worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .csv_dataset import collate_samples

__all__ = ["ResumableBatchSampler", "build_eval_loader", "build_train_loader"]

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
