"""The paper's studies as commands: ranking-order sweep, fusion ablation and baselines.

Each study trains every run with the same data, trunk and step budget, evaluates every task, and writes
``results/*.json`` and ``report.md``: :func:`dinorankclip.studies.runner.run_study`. This package imports
only the light study definitions, so the command line starts without loading torch.
"""

from .specs import PRESETS, STUDIES, RunSpec, StudyPreset, study_runs

__all__ = ["PRESETS", "STUDIES", "RunSpec", "StudyPreset", "study_runs"]
