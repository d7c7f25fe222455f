"""Run a study: train every run, evaluate every task, write results and the report.

Output folder::

    OUT/runs/<run>/            one training run (config.yaml, metrics.jsonl, model.safetensors, ...)
    OUT/results/<run>.json     the run's CLIP_benchmark-style records
    OUT/results/study.json     the study: runs, settings, timings and the records of every run
    OUT/plots/*.png            modality-gap plots per run and the study's comparison plots
    OUT/report.md              tables and plots

A run whose folder contains ``model.safetensors`` and ``training_state.json`` is finished and is not trained
again, and a run whose results file is newer than its model is not evaluated again. A run that was
interrupted continues from its newest checkpoint (``train.resume=latest``), so an interrupted study
continues where it stopped. A finished run whose saved config differs from the one the study
would use stops the study with an error, instead of mixing two settings in one table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, EvalConfig, load_config
from ..eval.runner import build_encoder, evaluate
from .report import write_report
from .specs import RunSpec, get_preset, study_runs

__all__ = ["StudyInterrupted", "is_finished", "plan_study", "run_study"]

logger = logging.getLogger(__name__)


class StudyInterrupted(Exception):
    """A stop signal ended a run's training after a checkpoint; rerunning the study continues from it."""

    def __init__(self, run: str, signal_name: str | None, step: int, total_steps: int) -> None:
        super().__init__(f"run {run} stopped at step {step} of {total_steps} on {signal_name or 'a stop signal'}; "
                         "rerun the same study command to continue from its checkpoint")
        self.run = run
        self.signal_name = signal_name

# Config keys that may differ between a finished run and a rerun without changing what was trained.
_IGNORED_KEYS = {"train.output_dir", "train.device", "train.resume", "data.num_workers", "train.tensorboard",
                 "eval"}


def is_finished(run_dir: Path) -> bool:
    """Return whether ``run_dir`` contains a completed training run."""
    return (run_dir / "model.safetensors").is_file() and (run_dir / "training_state.json").is_file()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in _IGNORED_KEYS:
            continue
        if isinstance(value, dict) and name.count(".") == 0:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    # Keys that only one side has come from another package version (a field added or removed), so only
    # keys that both configs have are compared.
    differing = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if differing:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing[:5])
        raise ConfigError(
            f"run {run_dir} was trained with other settings ({details}); use a new --out folder or delete the "
            "run folder to retrain it"
        )


def _run_config(spec: RunSpec, *, config: str, base: list[str], user: list[str], out: Path,
                steps: int | None) -> Config:
    # The run's own overrides come after the user's, so that a user override cannot turn one study into
    # another. The output folder and the step count are always the study's.
    # train.resume=latest continues an interrupted run from its newest checkpoint and starts a new one fresh.
    overrides = base + user + list(spec.overrides) + [f"train.output_dir={out / 'runs' / spec.name}",
                                                      "train.resume=latest"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return load_config(config, overrides)


def _train_run(spec: RunSpec, cfg: Config) -> dict[str, Any]:
    from ..train.trainer import train

    run_dir = Path(cfg.train.output_dir)
    if is_finished(run_dir):
        _check_same_config(run_dir, cfg)
        logger.info("Run %s is finished; skipping its training", spec.name)
        return json.loads((run_dir / "training_state.json").read_text())
    logger.info("Training run %s (%s) for %d steps", spec.name, " ".join(spec.overrides), cfg.train.steps)
    return train(cfg)


def _evaluate_run(spec: RunSpec, cfg: Config, eval_cfg: EvalConfig, skipped: dict, out: Path, *, device,
                  num_workers: int, reevaluate: bool) -> tuple[list[dict[str, Any]], float]:
    run_dir = Path(cfg.train.output_dir)
    results = out / "results" / f"{spec.name}.json"
    if (not reevaluate and results.is_file()
            and results.stat().st_mtime >= (run_dir / "model.safetensors").stat().st_mtime):
        logger.info("Run %s is evaluated already; reading %s", spec.name, results)
        saved = json.loads(results.read_text())
        return saved["records"], saved["eval_seconds"]
    from ..train.checkpoint import write_json

    started = time.perf_counter()
    encoder, _ = build_encoder(run_dir, device)
    records = evaluate(encoder, eval_cfg, model_name=spec.name, num_workers=num_workers, skipped=skipped,
                       plot_dir=out / "plots" / spec.name, pretrained=str(run_dir / "model.safetensors"))
    seconds = time.perf_counter() - started
    write_json(results, {"run": spec.name, "eval_seconds": seconds, "records": records})
    return records, seconds


def _study_configs(study: str, *, out: Path, preset: str, steps: int | None, overrides: list[str] | None,
                   teacher_weights: str | None, second_caption_column: str | None, device: str):
    spec = get_preset(preset)
    runs = study_runs(study, second_caption_column=second_caption_column or spec.second_caption_column)
    base = list(spec.overrides) + [f"train.device={device}"]
    if teacher_weights:
        base.append(f"teacher.weights={teacher_weights}")
    steps = steps if steps is not None else spec.steps.get(study)
    configs = {run.name: _run_config(run, config=spec.config, base=base, user=list(overrides or []), out=out,
                                     steps=steps) for run in runs}
    return spec, runs, configs


def plan_study(study: str, *, out: str | Path, preset: str = "tiny-cpu", steps: int | None = None,
               overrides: list[str] | None = None, teacher_weights: str | None = None,
               second_caption_column: str | None = None) -> list[str]:
    """Return one ``dinorankclip train`` command per run of the study, for launching each with ``torchrun``.

    A run trained by its command is finished when :func:`run_study` reaches it with the same arguments, so
    the study then only evaluates it.
    """
    import shlex

    out = Path(out)
    spec, runs, configs = _study_configs(study, out=out, preset=preset, steps=steps, overrides=overrides,
                                         teacher_weights=teacher_weights,
                                         second_caption_column=second_caption_column, device="auto")
    commands = []
    for run in runs:
        cfg = configs[run.name]
        base = list(spec.overrides) + ([f"teacher.weights={teacher_weights}"] if teacher_weights else [])
        args = base + list(overrides or []) + list(run.overrides) + ["train.resume=latest",
                                                                     f"train.steps={cfg.train.steps}"]
        commands.append(shlex.join(["dinorankclip", "train", "--config", spec.config,
                                    "--out", str(out / "runs" / run.name), *args]))
    return commands


def run_study(study: str, *, out: str | Path, preset: str = "tiny-cpu", steps: int | None = None,
              overrides: list[str] | None = None, teacher_weights: str | None = None,
              second_caption_column: str | None = None, eval_cfg: EvalConfig | None = None,
              skipped: dict[tuple[str, str], str] | None = None, device: str = "auto", num_workers: int = 0,
              reevaluate: bool = False) -> dict[str, Any]:
    """Train, evaluate and report one study.

    Args:
        study: ``order-sweep``, ``fusion-ablation`` or ``baselines``.
        out: the study folder.
        preset: a study preset (``tiny-cpu``) or any config preset or YAML file.
        steps: optimiser steps per run; None uses the preset's steps for this study, else train.steps.
        overrides: dotted config overrides applied to every run.
        teacher_weights: local DINOv3 weights for the runs that use a teacher.
        second_caption_column: the ALIP column of data.train; None uses the preset's.
        eval_cfg: evaluation datasets; None uses the preset's (the bundled data for ``tiny-cpu``).
        skipped: datasets reported as skipped, with reasons; None uses the preset's.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for training and evaluation.
        num_workers: evaluation data loader processes.
        reevaluate: evaluate finished runs again even when their results exist.

    Returns:
        The content of ``results/study.json``.
    """
    import os

    from ..train.checkpoint import write_json
    from ..train.distributed import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a study runs in one process; to train its runs on several GPUs, launch the commands "
                          "of `dinorankclip study ... --plan` with torchrun, then run the study to evaluate them")
    started = time.perf_counter()
    out = Path(out)
    spec, runs, configs = _study_configs(study, out=out, preset=preset, steps=steps, overrides=overrides,
                                         teacher_weights=teacher_weights,
                                         second_caption_column=second_caption_column, device=device)
    if eval_cfg is None:
        run_eval = next(iter(configs.values())).eval
        eval_cfg, preset_skipped = spec.eval_config(run_eval.batch_size)
        eval_cfg.max_bad_fraction = run_eval.max_bad_fraction
        skipped = preset_skipped if skipped is None else skipped
    if not (eval_cfg.zeroshot or eval_cfg.retrieval or eval_cfg.probe or eval_cfg.modality_gap):
        raise ConfigError(f"preset {preset!r} has no evaluation data; give datasets (--zeroshot, --retrieval, "
                          "--probe, --modality-gap) or --bundled-eval")

    summary: dict[str, Any] = {"study": study, "preset": preset, "out": str(out), "runs": []}
    for run in runs:
        run_started = time.perf_counter()
        state = _train_run(run, configs[run.name])
        if state.get("preempted"):
            raise StudyInterrupted(run.name, state.get("stop_signal"), int(state["steps"]),
                                   int(state["total_steps"]))
        records, eval_seconds = _evaluate_run(run, configs[run.name], eval_cfg, skipped or {}, out,
                                              device=resolve_device(device), num_workers=num_workers,
                                              reevaluate=reevaluate)
        summary["runs"].append({
            "name": run.name, "label": run.label, "params": run.params, "overrides": list(run.overrides),
            "steps": state.get("steps"), "train_seconds": state.get("seconds"), "eval_seconds": eval_seconds,
            "wall_seconds_this_invocation": time.perf_counter() - run_started, "records": records,
        })
        logger.info("Run %s done: %d steps, %.0f s training, %.0f s evaluation", run.name, state.get("steps", 0),
                    state.get("seconds", 0.0), eval_seconds)

    first = next(iter(configs.values()))
    summary["settings"] = {
        "config": spec.config, "steps": first.train.steps, "batch_size": first.train.batch_size,
        "trunk": first.model.trunk, "image_size": first.model.image_size, "teacher": first.teacher.name,
        "teacher_weights": first.teacher.weights, "data": first.data.train, "seed": first.train.seed,
        "notes": list(spec.notes),
    }
    summary["wall_seconds_this_invocation"] = time.perf_counter() - started
    write_json(out / "results" / "study.json", summary)
    write_report(out, summary)
    logger.info("Study %s finished in %.1f min; report: %s", study, summary["wall_seconds_this_invocation"] / 60,
                out / "report.md")
    return summary
