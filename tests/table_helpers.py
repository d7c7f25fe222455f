"""CSV helpers shared by the evaluation and study tests."""

from __future__ import annotations

import csv
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    """Return the rows of a CSV file as dicts keyed by its header."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_table(path: Path, rows: list[dict[str, str]], fields: list[str]) -> Path:
    """Write ``rows`` as a CSV file with columns ``fields`` (other keys are left out) and return ``path``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
