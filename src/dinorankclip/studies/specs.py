"""The studies: which runs each one trains, and the study presets that size them.

Every run of a study shares the data, the trunk, the batch size and the number of optimiser steps, which
is what matched compute means here. Only the overrides listed here differ between the runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import FUSION_VARIANTS, ConfigError, EvalConfig
from ..eval.bundled import BUNDLED_SECOND_CAPTION_COLUMN, bundled_eval, bundled_train_pairs

__all__ = ["PRESETS", "STUDIES", "RunSpec", "StudyPreset", "study_runs"]

STUDIES = ("order-sweep", "fusion-ablation", "baselines")
ORDERS = (0, 1, 2, 3, 4)
ABLATION_VARIANTS = tuple(v for v in FUSION_VARIANTS if v != "none") + ("none",)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study.

    Attributes:
        name: folder name under ``<out>/runs`` and key in the results.
        label: row label in the report.
        overrides: dotted config overrides that make this run differ from the others.
        params: values shown in the report tables (``order``, ``fusion``, ``loss``).
    """

    name: str
    label: str
    overrides: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)


def study_runs(study: str, *, second_caption_column: str | None = None) -> list[RunSpec]:
    """List the runs of ``study``.

    Args:
        study: one of :data:`STUDIES`.
        second_caption_column: the data column with a second caption per image, needed by ALIP in the
            baselines study.

    Raises:
        ConfigError: an unknown study, or the baselines study without a second caption column.
    """
    if study == "order-sweep":
        return [RunSpec(f"order{r}", f"R = {r}", ("loss.name=dinorankclip", f"loss.order={r}", "fusion.variant=full"),
                        {"order": r, "loss": "dinorankclip", "fusion": "full"}) for r in ORDERS]
    if study == "fusion-ablation":
        return [RunSpec(f"fusion_{v}", v, ("loss.name=dinorankclip", f"fusion.variant={v}"),
                        {"order": 3, "loss": "dinorankclip", "fusion": v}) for v in ABLATION_VARIANTS]
    if study == "baselines":
        # loss.order=null gives each baseline its own order (0, or 1 for RankCLIP) whatever the preset sets.
        if not second_caption_column:
            raise ConfigError("the baselines study trains ALIP, which needs a second caption per image; give "
                              "--second-caption-column COLUMN (a column of data.train)")
        return [
            RunSpec("clip", "CLIP", ("loss.name=clip", "loss.order=null", "fusion.variant=none"),
                    {"order": 0, "loss": "clip", "fusion": "none"}),
            RunSpec("cyclip", "CyCLIP", ("loss.name=cyclip", "loss.order=null", "fusion.variant=none"),
                    {"order": 0, "loss": "cyclip", "fusion": "none"}),
            RunSpec("alip", "ALIP", ("loss.name=alip", "loss.order=null", "fusion.variant=none",
                                     f"data.second_caption_column={second_caption_column}"),
                    {"order": 0, "loss": "alip", "fusion": "none"}),
            RunSpec("rankclip", "RankCLIP", ("loss.name=rankclip", "loss.order=null", "fusion.variant=none"),
                    {"order": 1, "loss": "rankclip", "fusion": "none"}),
            RunSpec("dinorankclip", "DinoRankCLIP", ("loss.name=dinorankclip", "loss.order=3", "fusion.variant=full"),
                    {"order": 3, "loss": "dinorankclip", "fusion": "full"}),
        ]
    raise ConfigError(f"unknown study {study!r}; allowed studies: {', '.join(STUDIES)}")


@dataclass(frozen=True)
class StudyPreset:
    """A config preset plus what a study needs on top of it.

    Attributes:
        config: config preset name or YAML file.
        overrides: overrides applied to every run (before the run's own and the user's).
        steps: optimiser steps per run for each study; a study missing here uses the config's train.steps.
        second_caption_column: the ALIP column of the preset's training data.
        bundled_eval: evaluate on the bundled sample data unless the caller gives datasets.
        notes: sentences the report prints under "Setup"; the evaluated datasets are listed there from the
            results, so a note must not name them.
    """

    config: str
    overrides: tuple[str, ...] = ()
    steps: dict[str, int] = field(default_factory=dict)
    second_caption_column: str | None = None
    bundled_eval: bool = False
    notes: tuple[str, ...] = ()

    def eval_config(self, batch_size: int) -> tuple[EvalConfig, dict[tuple[str, str], str]]:
        """Evaluation datasets of the preset and the datasets it reports as skipped."""
        if not self.bundled_eval:
            return EvalConfig(batch_size=batch_size), {}
        return bundled_eval(batch_size=batch_size)


def _tiny_cpu() -> StudyPreset:
    # Steps per run keep each study near 36 to 39 estimated minutes on the slowest 2-core CPU measured, within
    # the 60-minute budget. docs/studies.md has the step costs the estimate comes from.
    return StudyPreset(
        config="tiny-cpu",
        overrides=(
            f"data.train={bundled_train_pairs()}",
            "train.warmup_steps=10",
            "train.log_every=10",
            "train.tensorboard=false",
        ),
        steps={"order-sweep": 64, "fusion-ablation": 48, "baselines": 90},
        second_caption_column=BUNDLED_SECOND_CAPTION_COLUMN,
        bundled_eval=True,
        notes=(
            "Data: the bundled Flickr8k train split (3,765 pairs of 753 images).",
            "The tiny-cpu teacher has random weights unless --teacher-weights is given, so distillation and "
            "injection carry no DINOv3 knowledge in this preset.",
            "Toy scale: a 4-layer trunk at 64 px trained for minutes on a CPU. The numbers show that the "
            "pipeline runs end to end; differences between runs are mostly noise and say nothing about the "
            "method at CC3M scale.",
        ),
    )


PRESETS = {"tiny-cpu": _tiny_cpu}


def get_preset(name: str) -> StudyPreset:
    """Return the study preset ``name``; any other config preset or YAML file runs with its own settings."""
    if name in PRESETS:
        return PRESETS[name]()
    return StudyPreset(config=name)
