"""Counts of samples read and skipped during training, with the stop rule for too much bad data."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["BadDataError", "DataCounters"]

logger = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too many samples could not be read."""


class DataCounters:
    """Counts samples read and skipped, and stops the run past ``max_bad_fraction``."""

    def __init__(self, max_bad_fraction: float, *, min_samples: int = 64, log_limit: int = 20) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.log_limit = log_limit
        self.seen = 0
        self.bad = 0

    def update(self, batch: dict[str, Any]) -> None:
        self.seen += batch["num_samples"]
        for sample in batch["bad"]:
            self.bad += 1
            if self.bad <= self.log_limit:
                logger.warning("Skipped sample %d (%s): %s", sample.index, sample.source, sample.reason)
                if self.bad == self.log_limit:
                    logger.warning("Further skipped samples are counted in the metrics but not logged")
        fraction = self.bad / max(1, self.seen)
        if self.seen >= self.min_samples and fraction > self.max_bad_fraction:
            raise BadDataError(
                f"{self.bad} of {self.seen} samples ({fraction:.1%}) could not be read, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; fix the data or raise the threshold"
            )
