"""Metric records: one JSON object per line in ``metrics.jsonl`` and, optionally, TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter"]

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Append metric records to ``<run>/metrics.jsonl`` and TensorBoard (``<run>/tensorboard``).

    Only the process that owns the run folder (rank 0) creates a writer.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.handle = self.path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is a declared dependency; this guards broken installs
                logger.warning("TensorBoard logging is off: %s", err)
            else:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step}
        for key, value in values.items():
            record[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        self.handle.write(json.dumps(record, allow_nan=True) + "\n")
        self.handle.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.handle.close()
        if self.tb is not None:
            self.tb.close()
