"""Evaluation on the real-data subsets bundled in ``dinorankclip/sample_data``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..config import EvalConfig

__all__ = [
    "BUNDLED_SECOND_CAPTION_COLUMN",
    "FINE_GRAINED",
    "ZEROSHOT_SETS",
    "bundled_eval",
    "bundled_train_pairs",
    "sample_data_root",
]

# Zero-shot sets: dataset name -> labels table inside sample_data.
ZEROSHOT_SETS = {
    "cifar10": "cifar10/test.csv",
    "gtsrb": "gtsrb/labels.csv",
    "flowers102": "flowers102/labels.csv",
    "dtd": "dtd/labels.csv",
    "cub200": "cub200/labels.csv",
}
# The five fine-grained probe datasets; None marks a dataset with no bundled images.
FINE_GRAINED = {
    "cub200": "cub200/labels.csv",
    "flowers102": "flowers102/labels.csv",
    "fgvc_aircraft": None,
    "stanford_cars": None,
    "dtd": "dtd/labels.csv",
}
_MISSING_REASON = ("no {name} images are bundled with the package; give the dataset root with "
                   "--probe {name}=ROOT to include it")
# Column of flickr8k/train_pairs.csv with another human caption of the same image.
BUNDLED_SECOND_CAPTION_COLUMN = "caption2"


def sample_data_root() -> Path:
    """Return the folder of the real-data subset shipped inside the package."""
    return Path(str(resources.files("dinorankclip") / "sample_data"))


def bundled_train_pairs() -> Path:
    """Return the bundled Flickr8k train split with a second caption per row (``filepath,caption,caption2``)."""
    return sample_data_root() / "flickr8k" / "train_pairs.csv"


def bundled_eval(*, batch_size: int = 256) -> tuple[EvalConfig, dict[tuple[str, str], str]]:
    """Build the evaluation config of every task on the bundled data.

    Returns:
        The evaluation config and ``{("probe", name): reason}`` for the fine-grained datasets that have no
        bundled images.
    """
    root = sample_data_root()
    held_out = str(root / "flickr8k" / "test.csv")
    cfg = EvalConfig(
        batch_size=batch_size,
        zeroshot={name: str(root / path) for name, path in ZEROSHOT_SETS.items()},
        retrieval=held_out,
        probe={name: str(root / path) for name, path in FINE_GRAINED.items() if path is not None},
        modality_gap=held_out,
    )
    skipped = {("probe", name): _MISSING_REASON.format(name=name) for name, path in FINE_GRAINED.items()
               if path is None}
    return cfg, skipped
