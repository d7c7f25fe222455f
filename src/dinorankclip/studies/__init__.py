"""The studies of DinoRankCLIP (arXiv 2605.06592) as commands: order sweep, fusion ablation, baselines.

Each study trains every run with the same data, trunk and step budget, evaluates every task, and writes
``results/*.json`` and ``report.md``: :func:`dinorankclip.studies.runner.run_study`. This package imports
only the light study definitions, so the command line starts without loading torch.
"""

from .specs import PRESETS, STUDIES, RunSpec, StudyPreset, study_runs

__all__ = ["PRESETS", "STUDIES", "RunSpec", "StudyPreset", "study_runs"]
