"""WebDataset shard lists and the raw sample stream of one data worker.

Shards follow the img2dataset layout: a tar file of members ``KEY.EXT`` where the members of one
sample (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) are consecutive. Tar reading and the key/extension split
come from the ``webdataset`` library; grouping is done here so that a problem is counted instead of
raised.

Every data worker of the job (``world_size × num_workers`` of them, numbered ``g``) reads its own
sequence of *slots*. Without resampling, epoch ``e`` orders all shards by a permutation drawn from
``(seed, e)``, and worker ``g`` takes positions ``g, g + G, g + 2G, …``. With resampling, each slot draws
a shard with replacement from ``(seed, g, slot)``. The stream never ends, so every process takes the
same number of steps whatever the shard sizes. A position in the stream is ``(slot, offset)``: the
slot counter and the number of samples already read from that slot's shard.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from .csv_dataset import BadSample

__all__ = ["CaptionSpec", "RawRecord", "ShardPlan", "ShardReader", "expand_shards", "mix_seed", "shard_sizes"]

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

# Members such as __key__ or __meta__/... carry metadata, not samples (webdataset's rule).
_META_MEMBER = re.compile(rf"^{re.escape(meta_prefix)}[^/]*{re.escape(meta_suffix)}($|/)")

# A shard whose first CAPTION_PROBE samples all lack the caption is rejected without reading further.
CAPTION_PROBE = 256


def mix_seed(*values: int) -> int:
    """Hash integers to a seed in [0, 2**63) (SplitMix64 finaliser after each value)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def expand_shards(spec: str) -> list[str]:
    """Expand a shard specification: ``::`` joins lists, braces expand (``shard-{000..099}.tar``).

    Raises:
        ValueError: the specification expands to nothing.
        FileNotFoundError: none of the listed shards exists.
    """
    shards = [url for url in expand_urls(spec) if url]
    if not shards:
        raise ValueError(f"data.train={spec!r} expands to no shard; write e.g. data/shard-{{000000..000099}}.tar")
    missing = [url for url in shards if not Path(url).is_file()]
    if len(missing) == len(shards):
        raise FileNotFoundError(
            f"data.train={spec!r}: none of its {len(shards)} shards exists (first: {shards[0]}); "
            "check the path and the brace range"
        )
    if missing:
        logger.warning("%d of the %d shards of %s do not exist (first: %s); each pass counts them as skipped "
                       "(skipped_missing_shard)", len(missing), len(shards), spec, missing[0])
    return shards


def shard_sizes(shards: list[str]) -> int | None:
    """Sum the sample counts of ``shards`` from ``sizes.json`` files beside them (None when any is unknown).

    ``sizes.json`` maps shard file names to sample counts, as written by ``dinorankclip data pack`` and
    read by open_clip.
    """
    tables: dict[Path, dict[str, int]] = {}
    total = 0
    for url in shards:
        folder = Path(url).parent
        if folder not in tables:
            try:
                tables[folder] = json.loads((folder / "sizes.json").read_text())
            except (OSError, ValueError):
                tables[folder] = {}
        count = tables[folder].get(Path(url).name)
        if count is None:
            return None
        total += int(count)
    return total


@dataclass(frozen=True)
class CaptionSpec:
    """Caption location: a member extension (``txt``) or a field of the ``json`` member (``json:FIELD``)."""

    member: str
    field: str | None = None

    @classmethod
    def parse(cls, spec: str) -> CaptionSpec:
        spec = spec.strip()
        if spec.lower().startswith("json:"):
            return cls("json", spec[5:].strip())
        return cls(spec.lower())

    def __str__(self) -> str:
        return f"json:{self.field}" if self.field is not None else self.member

    def read(self, members: dict[str, bytes]) -> str | None:
        """Return the caption text, or None when the sample has none.

        Raises:
            UnicodeDecodeError: the caption bytes are not UTF-8.
        """
        data = members.get(self.member)
        if data is None:
            return None
        if self.field is None:
            return data.decode("utf-8")
        try:
            value = json.loads(data.decode("utf-8")).get(self.field)
        except (ValueError, AttributeError):
            return None
        return None if value is None else str(value)


@dataclass
class RawRecord:
    """The undecoded members of one sample and where it sits in the stream."""

    key: str
    url: str
    members: dict[str, bytes]
    slot: int
    offset: int
    seed: int  # seed of the sample's random crop; independent of the number of workers without resampling


@dataclass
class ShardPlan:
    """Assignment of shards to the job's data workers, slot by slot.

    Args:
        shards: shard paths.
        seed: base seed of the shard orders and sample seeds.
        num_workers: data workers in the whole job (processes × workers per process).
        resampled: draw shards with replacement.
    """

    shards: list[str]
    seed: int
    num_workers: int
    resampled: bool = False
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.resampled and len(self.shards) < self.num_workers:
            raise ValueError(
                f"data.train lists {len(self.shards)} shards but the job has {self.num_workers} data workers "
                "(processes × data.num_workers) and each needs at least one shard per epoch; use more shards, "
                "fewer data.num_workers, or data.resampled=true"
            )

    def slots_per_epoch(self, worker: int) -> int:
        """Number of slots one epoch gives ``worker``."""
        if self.resampled:
            return max(1, math.ceil(len(self.shards) / self.num_workers))
        return len(range(worker, len(self.shards), self.num_workers))

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
            self._orders = {epoch: torch.randperm(len(self.shards), generator=generator).tolist()}
        return self._orders[epoch]

    def slot(self, worker: int, slot: int) -> tuple[str, int, int]:
        """Return (shard path, epoch, seed base of its samples) for ``worker``'s ``slot``."""
        per_epoch = self.slots_per_epoch(worker)
        epoch, index = divmod(slot, per_epoch)
        if self.resampled:
            base = mix_seed(self.seed, worker, self.num_workers, slot)
            return self.shards[base % len(self.shards)], epoch, base
        position = worker + index * self.num_workers
        return self.shards[self._order(epoch)[position]], epoch, mix_seed(self.seed, epoch, position)


class _ShardStats:
    """Caption presence in one shard, for the error about a wrong caption key."""

    def __init__(self) -> None:
        self.samples = 0
        self.with_caption = 0
        self.extensions: set[str] = set()
        self.json_fields: set[str] = set()

    def add(self, members: dict[str, bytes], caption: CaptionSpec) -> None:
        self.samples += 1
        self.extensions.update(members)
        if "json" in members and not self.json_fields:
            try:
                self.json_fields.update(json.loads(members["json"].decode("utf-8")))
            except (ValueError, TypeError):
                pass
        try:
            if caption.read(members) is not None:
                self.with_caption += 1
        except UnicodeDecodeError:
            self.with_caption += 1  # a caption is there; decoding it fails later and is counted

    def check(self, url: str, caption: CaptionSpec, *, final: bool) -> None:
        if self.with_caption or self.samples == 0 or (not final and self.samples < CAPTION_PROBE):
            return
        found = ", ".join(sorted(self.extensions)) or "none"
        fields = f"; fields of .json: {', '.join(sorted(self.json_fields))}" if self.json_fields else ""
        scope = "any of its" if final else "the first"
        raise ValueError(
            f"shard {url}: {scope} {self.samples} samples has no caption under data.caption_key='{caption}'; "
            f"member extensions found: {found}{fields}. Set data.caption_key to the caption's extension "
            "(e.g. txt) or to json:FIELD"
        )


class ShardReader:
    """Endless stream of raw samples (:class:`RawRecord`) and bad-sample markers for one data worker.

    Structural problems never stop the stream: a missing or unreadable shard, a truncated tar and a
    sample key seen before in the same shard each yield a :class:`BadSample` and reading goes on. Each
    marker, like each sample, advances the position by one, so a resumed reader does not repeat it.

    Args:
        plan: the job's shard plan.
        worker: global data-worker number g.
        caption: where captions live (for the missing-caption error).
        slot, offset: start position.

    Raises (while iterating):
        ValueError: a shard has no caption under the expected key (the message lists the keys found).
        FileNotFoundError: no shard of a whole epoch could be read.
    """

    def __init__(self, plan: ShardPlan, worker: int, caption: CaptionSpec, *, slot: int = 0, offset: int = 0) -> None:
        self.plan = plan
        self.worker = worker
        self.caption = caption
        self.slot = slot
        self.offset = offset

    def __iter__(self) -> Iterator[RawRecord | BadSample]:
        empty_slots = 0
        while True:
            url, _, seed_base = self.plan.slot(self.worker, self.slot)
            produced = False
            for item in self._read(url, seed_base, skip=self.offset):
                produced = produced or isinstance(item, RawRecord)
                yield item
            empty_slots = 0 if produced else empty_slots + 1
            if empty_slots > self.plan.slots_per_epoch(self.worker):
                raise FileNotFoundError(
                    f"data worker {self.worker} read no sample from a whole epoch of its shards (last: {url}); "
                    "check that the shards exist and are tar files"
                )
            self.slot += 1
            self.offset = 0

    def _marker(self, url: str, kind: str, reason: str, key: str | None, skip: int) -> BadSample | None:
        offset = self.offset
        self.offset += 1
        if offset < skip:
            return None
        return BadSample(index=-1, source=url, reason=reason, kind=kind, key=key)

    def _read(self, url: str, seed_base: int, *, skip: int) -> Iterator[RawRecord | BadSample]:
        """Yield the samples of one shard after the first ``skip`` ones (markers included)."""
        self.offset = 0
        try:
            handle = open(url, "rb")  # noqa: SIM115 (closed in the finally below)
        except OSError as err:
            marker = self._marker(url, "missing_shard", f"cannot open shard ({err})", None, skip)
            if marker is not None:
                yield marker
            return
        stats = _ShardStats()
        keys: set[str] = set()
        pending_key: str | None = None
        pending: dict[str, bytes] = {}

        def finish(key: str, members: dict[str, bytes]) -> RawRecord | BadSample | None:
            offset = self.offset
            self.offset += 1
            duplicate = key in keys
            keys.add(key)
            if not duplicate:
                stats.add(members, self.caption)
                stats.check(url, self.caption, final=False)
            if offset < skip:
                return None
            if duplicate:
                return BadSample(index=-1, source=url, reason="sample key already used earlier in this shard",
                                 kind="duplicate_key", key=key)
            return RawRecord(key, url, members, self.slot, offset, mix_seed(seed_base, offset))

        try:
            # tarfile directly rather than webdataset's tar_file_iterator: a read error must be tied to the
            # member being read, so that the sample before it is kept and the damaged one is counted.
            stream = tarfile.open(fileobj=handle, mode="r|*")
            for info in stream:
                if not info.isreg() or _META_MEMBER.match(info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if pending_key is not None and (prefix != pending_key or suffix in pending):
                    item = finish(pending_key, pending)
                    if item is not None:
                        yield item
                    pending = {}
                pending_key = prefix
                pending[suffix] = stream.extractfile(info).read()
                stream.members = []  # tarfile keeps every header otherwise
        except (tarfile.TarError, OSError, EOFError) as err:
            marker = self._marker(url, "truncated_tar", f"tar file is truncated or corrupt ({err})", pending_key, skip)
            if marker is not None:
                yield marker
            pending_key = None
        finally:
            handle.close()
        if pending_key is not None:
            item = finish(pending_key, pending)
            if item is not None:
                yield item
        stats.check(url, self.caption, final=True)
