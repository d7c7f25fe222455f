"""Counts of samples read and skipped during training, with the stop rule for too much bad data."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

__all__ = ["BAD_KINDS", "BadDataError", "DataCounters"]

logger = logging.getLogger(__name__)

# Failure classes of skipped samples; each is a metric ``skipped_<kind>``. Unknown kinds count as "other".
BAD_KINDS = (
    "missing_file",
    "read_error",
    "empty_image",
    "decode_error",
    "missing_image",
    "missing_caption",
    "caption_not_utf8",
    "duplicate_key",
    "truncated_tar",
    "missing_shard",
    "other",
)


class BadDataError(RuntimeError):
    """Too many samples could not be read."""


class DataCounters:
    """Counts samples read and skipped, logs skipped samples and stops the run past ``max_bad_fraction``.

    In a distributed job each process logs the bad samples it reads (:meth:`record`), the trainer sums
    the per-process counts over all processes and every process applies the same sum (:meth:`apply`),
    so all processes stop together.

    Args:
        max_bad_fraction: largest tolerated fraction of skipped samples.
        min_samples: samples read before the fraction is checked, so a bad first batch does not stop a run.
        log_limit: skipped samples logged one by one; later ones are summarised.
        log_interval: seconds between two summary lines once ``log_limit`` is reached.
    """

    def __init__(
        self, max_bad_fraction: float, *, min_samples: int = 64, log_limit: int = 20, log_interval: float = 60.0
    ) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.log_limit = log_limit
        self.log_interval = log_interval
        self.seen = 0
        self.bad = 0
        self.by_kind = dict.fromkeys(BAD_KINDS, 0)
        self._logged = 0
        self._unlogged = 0
        self._last_summary = time.monotonic()

    def record(self, batch: dict[str, Any]) -> torch.Tensor:
        """Log this process's skipped samples of ``batch`` and return its counts.

        Returns:
            int64 tensor [2 + len(BAD_KINDS)]: samples read, samples skipped, then skips per kind.
        """
        counts = torch.zeros(2 + len(BAD_KINDS), dtype=torch.int64)
        counts[0] = int(batch["num_samples"])
        counts[1] = len(batch["bad"])
        for sample in batch["bad"]:
            kind = getattr(sample, "kind", "other")
            counts[2 + (BAD_KINDS.index(kind) if kind in BAD_KINDS else BAD_KINDS.index("other"))] += 1
            self._log(sample)
        return counts

    def _log(self, sample: Any) -> None:
        if self._logged < self.log_limit:
            self._logged += 1
            key = getattr(sample, "key", None)
            where = f"{sample.source} key {key}" if key is not None and key != sample.source else sample.source
            logger.warning("Skipped sample (%s) in %s: %s", getattr(sample, "kind", "other"), where, sample.reason)
            if self._logged == self.log_limit:
                logger.warning("Further skipped samples are summarised at most every %.0f s", self.log_interval)
            return
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_summary >= self.log_interval:
            logger.warning("%d more samples skipped in the last %.0f s (totals are in the metrics)",
                           self._unlogged, now - self._last_summary)
            self._unlogged = 0
            self._last_summary = now

    def apply(self, counts: torch.Tensor) -> None:
        """Add counts summed over all processes, then stop the run if too many samples were bad.

        Raises:
            BadDataError: more than ``max_bad_fraction`` of at least ``min_samples`` samples were skipped.
        """
        values = [int(v) for v in counts.tolist()]
        self.seen += values[0]
        self.bad += values[1]
        for kind, value in zip(BAD_KINDS, values[2:], strict=True):
            self.by_kind[kind] += value
        fraction = self.bad / max(1, self.seen)
        if self.seen >= self.min_samples and fraction > self.max_bad_fraction:
            kinds = ", ".join(f"{kind} {count}" for kind, count in self.by_kind.items() if count)
            raise BadDataError(
                f"{self.bad} of {self.seen} samples ({fraction:.1%}) could not be read ({kinds}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; fix the data or raise the threshold"
            )

    def update(self, batch: dict[str, Any]) -> None:
        """Record and apply one batch in a single process."""
        self.apply(self.record(batch))

    def metrics(self) -> dict[str, int]:
        """Return ``samples_seen``, ``samples_skipped`` and ``skipped_<kind>`` for every kind seen."""
        values = {"samples_seen": self.seen, "samples_skipped": self.bad}
        values.update({f"skipped_{kind}": count for kind, count in self.by_kind.items() if count})
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.bad, "by_kind": dict(self.by_kind)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.bad = int(state["bad"])
        self.by_kind = dict.fromkeys(BAD_KINDS, 0)
        for kind, count in state.get("by_kind", {}).items():
            self.by_kind[kind if kind in self.by_kind else "other"] += int(count)
