"""Training batches from WebDataset shards, resumable at any batch.

Each data worker (see ``shards.py``) reads its raw samples, mixes them in a shuffle buffer, decodes them
and collates full batches of good samples. Skipped samples travel with the batch that follows them.
Every batch carries the worker's position after it (``data_state``): the slot and offset of its shard
reader, the buffer's contents as stream positions, its capacity, and the number of buffer draws. The
main process keeps the newest position of every worker, and a resumed worker rebuilds its buffer by
re-reading those positions (no decoding), so a resumed run sees exactly the batches an uninterrupted run
would have seen.

With ``num_workers`` DataLoader workers, batch t of a process comes from worker t mod num_workers (the
DataLoader's round-robin order). After a resume at batch n, DataLoader worker k plays the role of
logical worker (k + n) mod num_workers, which keeps that order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .counters import BadDataError
from .csv_dataset import BadSample, collate_samples
from .images import ImageDecodeError, decode_image
from .shards import CaptionSpec, RawRecord, ShardPlan, ShardReader, mix_seed

__all__ = ["MAX_BAD_IN_A_ROW", "ShardBatches", "ShardLoader", "WorkerStream"]

logger = logging.getLogger(__name__)

# Bad samples in a row after which a worker stops with BadDataError (no batch reaches the main process,
# so its bad-fraction check could never run).
MAX_BAD_IN_A_ROW = 1000


class SampleDecoder:
    """Turn a raw record into a training sample (views, tokens, key) or a :class:`BadSample`.

    Args:
        transform: PairedViews-like callable (image, generator) -> dict of view tensors.
        tokenizer: callable from a list of strings to token ids [n, L].
        image_keys: image member extensions in order of preference.
        caption, second_caption: where the caption (and ALIP's second caption) live.
        exif_transpose: apply EXIF orientation.
        min_decode_size: JPEG draft size (None decodes at full size).
    """

    def __init__(
        self,
        transform: Callable,
        tokenizer: Callable,
        *,
        image_keys: tuple[str, ...],
        caption: CaptionSpec,
        second_caption: CaptionSpec | None = None,
        exif_transpose: bool = True,
        min_decode_size: int | None = None,
    ) -> None:
        self.transform = transform
        self.tokenizer = tokenizer
        self.image_keys = image_keys
        self.caption = caption
        self.second_caption = second_caption
        self.exif_transpose = exif_transpose
        self.min_decode_size = min_decode_size

    def _bad(self, record: RawRecord, kind: str, reason: str) -> BadSample:
        return BadSample(index=-1, source=record.url, reason=reason, kind=kind, key=record.key)

    def _caption(self, record: RawRecord, spec: CaptionSpec) -> str | BadSample:
        try:
            text = spec.read(record.members)
        except UnicodeDecodeError as err:
            return self._bad(record, "caption_not_utf8", f"caption '{spec}' is not valid UTF-8 ({err.reason})")
        if text is None:
            found = ", ".join(sorted(record.members))
            return self._bad(record, "missing_caption", f"no caption '{spec}' (members: {found})")
        return text

    def __call__(self, record: RawRecord) -> dict[str, Any] | BadSample:
        image_key = next((key for key in self.image_keys if key in record.members), None)
        if image_key is None:
            found = ", ".join(sorted(record.members))
            return self._bad(record, "missing_image", f"no image member ({'/'.join(self.image_keys)}); found {found}")
        caption = self._caption(record, self.caption)
        if isinstance(caption, BadSample):
            return caption
        second = self._caption(record, self.second_caption) if self.second_caption is not None else None
        if isinstance(second, BadSample):
            return second
        name = f"{record.url}:{record.key}.{image_key}"
        try:
            image = decode_image(record.members[image_key], exif_transpose=self.exif_transpose, name=name,
                                 min_size=self.min_decode_size)
        except ImageDecodeError as err:
            return self._bad(record, err.kind, str(err))
        sample = self.transform(image, torch.Generator().manual_seed(record.seed))
        sample["text"] = self.tokenizer([caption.strip()])[0]
        if second is not None:
            sample["text2"] = self.tokenizer([second.strip()])[0]
        sample["index"] = -1
        sample["key"] = record.key
        return sample


class WorkerStream:
    """Batches of one logical data worker, from a saved position.

    Args:
        plan: the job's shard plan.
        worker: global data-worker number g.
        logical: this worker's number within its process (stored in ``data_state``).
        decoder: raw record -> sample.
        batch_size: good samples per batch.
        buffer_size: shuffle-buffer capacity in samples (0: no shuffling inside shards).
        seed: base seed of the buffer draws.
        state: a ``data_state`` from an earlier batch of this worker, or None to start at the beginning.
    """

    def __init__(
        self,
        plan: ShardPlan,
        worker: int,
        logical: int,
        decoder: SampleDecoder,
        *,
        batch_size: int,
        buffer_size: int,
        seed: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.plan = plan
        self.worker = worker
        self.logical = logical
        self.decoder = decoder
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.seed = mix_seed(seed, 0xB0FF, worker, plan.num_workers)
        state = state or {}
        self.reader = ShardReader(plan, worker, decoder.caption, slot=int(state.get("slot", 0)),
                                  offset=int(state.get("offset", 0)))
        self.draws = int(state.get("draws", 0))
        self.batches = int(state.get("batches", 0))
        # Records in the buffer at each draw. A checkpoint written before this field existed had a full buffer
        # of buffer_size records.
        self.capacity = int(state.get("capacity", buffer_size))
        self.buffer: list[RawRecord] = self._refill(state.get("buffer", []))
        self.records_read = 0  # raw records and bad-sample markers read since the last batch

    def _refill(self, positions: list[list[int]]) -> list[RawRecord]:
        """Re-read the raw records at ``positions`` ([slot, offset] pairs) without decoding them."""
        if not positions:
            return []
        wanted: dict[tuple[int, int], int] = {(int(s), int(o)): i for i, (s, o) in enumerate(positions)}
        found: list[RawRecord | None] = [None] * len(positions)
        for slot in sorted({s for s, _ in wanted}):
            last = max(o for s, o in wanted if s == slot)
            reader = ShardReader(self.plan, self.worker, self.decoder.caption, slot=slot)
            url, _, seed_base = self.plan.slot(self.worker, slot)
            for item in reader._read(url, seed_base, skip=0):
                if isinstance(item, RawRecord) and (slot, item.offset) in wanted:
                    found[wanted[(slot, item.offset)]] = item
                if reader.offset > last:
                    break
        missing = [positions[i] for i, record in enumerate(found) if record is None]
        if missing:
            raise RuntimeError(
                f"data worker {self.worker}: cannot re-read {len(missing)} buffered samples at (slot, offset) "
                f"{missing[:3]}; the shards changed since the checkpoint was written"
            )
        return [record for record in found if record is not None]

    def state(self) -> dict[str, Any]:
        return {
            "worker": self.logical,
            "slot": self.reader.slot,
            "offset": self.reader.offset,
            "draws": self.draws,
            "batches": self.batches,
            "capacity": self.capacity,
            "buffer": [[record.slot, record.offset] for record in self.buffer],
        }

    def _epoch(self, slot: int) -> int:
        return self.plan.slot(self.worker, slot)[1]

    def _records(self) -> Iterator[RawRecord | BadSample]:
        """Raw records through the shuffle buffer; bad-sample markers pass straight through.

        The buffer contains at most one pass over the worker's shards: when the reader starts the next epoch
        before the buffer is full, the capacity shrinks to what was read so far plus that next record. A
        larger buffer would hold several copies of each sample, put copies into one batch (false negatives
        for the contrastive loss), and read every damaged shard once per pass before the first batch.
        """
        for item in self.reader:
            self.records_read += 1
            if isinstance(item, BadSample):
                yield item
                continue
            if self.buffer_size == 0:
                yield item
                continue
            filling = self.draws == 0 and len(self.buffer) + 1 < self.capacity
            if filling and self.buffer and self._epoch(item.slot) > self._epoch(self.buffer[0].slot):
                self.capacity = len(self.buffer) + 1
                logger.info(
                    "Data worker %d: one pass over its shards has %d samples, fewer than data.shuffle_buffer=%d, "
                    "so the buffer draws from %d samples (that pass and the first sample of the next)",
                    self.worker, len(self.buffer), self.buffer_size, self.capacity,
                )
            self.buffer.append(item)
            if len(self.buffer) < self.capacity:
                continue
            index = mix_seed(self.seed, self.draws) % len(self.buffer)
            self.draws += 1
            self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
            yield self.buffer.pop()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        good: list[dict[str, Any]] = []
        bad: list[BadSample] = []
        bad_in_a_row = 0
        for item in self._records():
            sample = item if isinstance(item, BadSample) else self.decoder(item)
            if isinstance(sample, BadSample):
                bad.append(sample)
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                    raise BadDataError(
                        f"data worker {self.worker}: {bad_in_a_row} unreadable samples in a row, the last "
                        f"{sample.source} key {sample.key} ({sample.reason})"
                    )
                continue
            bad_in_a_row = 0
            good.append(sample)
            if len(good) == self.batch_size:
                batch = collate_samples(good)
                batch["bad"] = bad
                batch["num_bad"] = len(bad)
                # Samples read, not delivered: the buffer fill reads far more records than the first batch
                # holds, and the bad fraction must be taken over what was read.
                batch["num_samples"] = self.records_read
                self.records_read = 0
                self.batches += 1
                batch["data_state"] = self.state()
                yield batch
                good, bad = [], []


class ShardBatches(IterableDataset):
    """Endless batches of one process from WebDataset shards (an IterableDataset for the DataLoader).

    Args:
        plan: the job's shard plan (``plan.num_workers`` = processes × workers per process).
        decoder: raw record -> sample.
        rank: this process's rank.
        num_workers: DataLoader workers of this process (0 counts as one, in the main process).
        batch_size: samples per batch of this process.
        buffer_size: shuffle-buffer capacity per worker.
        seed: base seed.
        states: one saved ``data_state`` (or None) per logical worker.
        rotation: DataLoader worker k plays logical worker (k + rotation) mod num_workers.
    """

    def __init__(
        self,
        plan: ShardPlan,
        decoder: SampleDecoder,
        *,
        rank: int,
        num_workers: int,
        batch_size: int,
        buffer_size: int,
        seed: int,
        states: list[dict[str, Any] | None],
        rotation: int = 0,
    ) -> None:
        self.plan = plan
        self.decoder = decoder
        self.rank = rank
        self.workers = max(1, num_workers)
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.seed = seed
        self.states = states
        self.rotation = rotation

    def stream(self, logical: int) -> WorkerStream:
        return WorkerStream(
            self.plan, self.rank * self.workers + logical, logical, self.decoder, batch_size=self.batch_size,
            buffer_size=self.buffer_size, seed=self.seed, state=self.states[logical],
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = 0 if info is None else info.id
        return iter(self.stream((loader_worker + self.rotation) % self.workers))


class ShardLoader:
    """Iterator of training batches from shards, with the position of every worker for checkpoints.

    Args:
        dataset: the process's :class:`ShardBatches`.
        num_workers: DataLoader workers (0 reads in the main process).
        world_size: processes in the job (stored with the position: positions only fit the same layout).
        batches: batches this process consumed before (resume position).
        pin_memory: pin batches for faster host-to-GPU copies.
        num_samples: samples per epoch of the whole job, when known.
        batches_per_epoch: global batches per epoch, when known.
    """

    def __init__(self, dataset: ShardBatches, *, num_workers: int, world_size: int = 1, batches: int = 0,
                 pin_memory: bool = False, num_samples: int | None = None,
                 batches_per_epoch: int | None = None) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.world_size = world_size
        self.batches = batches
        self.num_samples = num_samples
        self.batches_per_epoch = batches_per_epoch
        self.worker_states: list[dict[str, Any] | None] = list(dataset.states)
        if num_workers == 0:
            self._iterator: Iterator = iter(dataset)
        else:
            loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                persistent_workers=False)
            self._iterator = iter(loader)

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        state = batch.pop("data_state")
        self.worker_states[state["worker"]] = state
        self.batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "webdataset",
            "batches": self.batches,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "workers": copy.deepcopy(self.worker_states),
        }

    def close(self) -> None:
        self._iterator = iter(())
