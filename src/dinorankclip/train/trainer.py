"""Training loop: set-up, schedule, metrics, resumable checkpoints, preemption and the non-finite guard.

One process or a ``torchrun``/SLURM job of many, where only rank 0 logs metrics and writes files. The
forward and backward passes (autocast, DDP, gradient accumulation) live in ``step.py``, the checkpoint
format in ``resume.py``. SIGTERM and SIGUSR1 (preemption notices of SLURM and most clusters) and a first
SIGINT (Ctrl-C) make every process finish the current step, write a resumable checkpoint and return cleanly.
``train.resume=latest`` continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..data.counters import BadDataError, DataCounters
from ..data.loader import build_train_data
from ..data.transforms import PairedViews
from ..losses import Objective
from ..models.dinorankclip import build_model
from ..models.trunk import build_tokenizer
from .checkpoint import atomic_write, read_model_metadata, save_model, write_json
from .distributed import DistributedContext, init_distributed
from .metrics import MetricsWriter
from .optim import build_optimizer, lr_factor
from .resume import capture_rng, earlier_checkpoint, load_checkpoint, resolve_resume, restore_rng, save_checkpoint
from .step import StepRunner, TrainForward
from .teacher_source import build_teacher_source

__all__ = ["BadDataError", "NonFiniteLossError", "seed_everything", "train"]

logger = logging.getLogger(__name__)

# SIGINT is Ctrl-C in a terminal: the first one stops like a preemption notice, a second one interrupts at once.
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite for too many steps in a row."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _check_config(cfg: Config, ctx: DistributedContext) -> None:
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give a CSV/TSV with filepath,caption columns or WebDataset shards")
    second = cfg.data.second_caption_column or cfg.data.second_caption_key
    if second and cfg.loss.name != "alip":
        logger.warning("The second captions (%s) are only used by loss.name=alip; loss.name=%s ignores them",
                       second, cfg.loss.name)
    if cfg.loss.name == "alip" and not second:
        raise ConfigError(
            "loss.name=alip needs a second caption per image; set data.second_caption_column=<column> for a table "
            "or data.second_caption_key=<ext or json:FIELD> for shards"
        )
    parts = ctx.world_size * cfg.train.grad_accum_steps
    if cfg.train.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not split over {ctx.world_size} processes × "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps} micro-batches; use a multiple of {parts}"
        )


def _enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing in every submodule that supports it (open_clip towers, timm ViTs)."""
    for module in model.modules():
        if module is not model and hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric records after ``step`` (written by a run that stopped after its last checkpoint)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a kill
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))


# Files and folders of a run folder that a fresh run would overwrite or mix with its own.
RUN_OUTPUTS = ("model.safetensors", "objective.safetensors", "training_state.json", "metrics.jsonl", "checkpoints",
               "tensorboard")


def _prepare_run_dir(cfg: Config, run_dir: Path, resume_from: Path | None, is_main: bool) -> None:
    """Check that a fresh run does not overwrite an earlier one in ``run_dir``; clear it with train.overwrite.

    Raises:
        ConfigError: ``run_dir`` contains an earlier run and neither a resume nor train.overwrite is set.
    """
    if resume_from is not None:
        return
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if cfg.train.resume == "latest" and "model.safetensors" not in found:
        # No checkpoint yet: ``latest`` starts the run, and records of an attempt killed before its first
        # checkpoint are dropped.
        found = []
        if is_main:
            _truncate_metrics(run_dir, 0)
    if not found:
        return
    if not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir={str(run_dir)!r} already contains a run ({', '.join(found)}); continue it with "
            "--resume latest, choose another --out, or set train.overwrite=true to delete its results and start afresh"
        )
    if is_main:
        logger.warning("train.overwrite=true: deleting %s in %s", ", ".join(found), run_dir)
        for name in found:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


# Errors of reading a damaged checkpoint: torch.load, safetensors, JSON and missing entries.
_LOAD_ERRORS = (RuntimeError, ValueError, OSError, EOFError, KeyError, SafetensorError, pickle.UnpicklingError)

# Keys that may change between a run and its resumption without changing what is trained.
_RESUME_FREE_KEYS = ("train.resume", "train.output_dir", "train.device", "train.time_budget_minutes",
                     "train.overwrite", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.tensorboard", "data.num_workers")


def _warn_changed_config(path: Path, cfg: Config) -> None:
    """Log the config keys whose values differ from those the checkpoint ``path`` was written with."""
    try:
        saved, _ = read_model_metadata(path / "model.safetensors")
    except (RuntimeError, ValueError, OSError, KeyError, SafetensorError):
        return  # an unreadable checkpoint is reported when it is loaded

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key not in ("model_kwargs", "zeroshot"):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    before, now = flat(saved.to_dict()), flat(cfg.to_dict())
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if before.get(key) != now.get(key) and key not in _RESUME_FREE_KEYS]
    if changed:
        logger.warning("Resuming %s with a changed config (%s); config.yaml now records the new values",
                       path, "; ".join(changed))


class _StopSignal:
    """Records SIGTERM, SIGUSR1 and a first SIGINT; installed before the data workers start, so they inherit
    the handler too (a forked worker then ignores the signal instead of dying before the checkpoint is written)."""

    def __init__(self) -> None:
        self.received = False
        self.signal_name: str | None = None  # the first stop signal this process received
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = True
        self.signal_name = signal.Signals(signum).name
        hint = "; press Ctrl-C again to stop at once without it" if signum == signal.SIGINT else ""
        logger.warning("Received %s: saving a checkpoint after the current step%s", signal.Signals(signum).name,
                       hint)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.info("Not on the main thread: SIGTERM, SIGUSR1 and SIGINT keep their handlers")
            return
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def train(cfg: Config) -> dict[str, Any]:
    """Train a model as configured and write the run folder ``cfg.train.output_dir``.

    Returns:
        A summary with ``run_dir``, ``steps``, ``seconds``, ``preempted`` and the data counters.

    Raises:
        BadDataError: more than ``data.max_bad_fraction`` of the samples could not be read.
        NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite losses in a row.
    """
    ctx = init_distributed(cfg.train.device)
    stop = _StopSignal()
    stop.install()
    try:
        _check_config(cfg, ctx)
        return _Run(cfg, ctx, stop).run()
    finally:
        stop.uninstall()
        ctx.shutdown()


class _Run:
    """One training run: set-up in ``__init__``, the step loop in :meth:`run`."""

    def __init__(self, cfg: Config, ctx: DistributedContext, stop: _StopSignal) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.stop = stop
        device = ctx.device
        self.run_dir = Path(cfg.train.output_dir)
        # The saved config describes the run, not how this process was started.
        self.saved_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=None))
        self.resume_from = resolve_resume(cfg.train.resume, self.run_dir)
        _prepare_run_dir(cfg, self.run_dir, self.resume_from, ctx.is_main)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.saved_cfg.save(self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)

        self.teacher, geometry = build_teacher_source(cfg, device)
        self.model = build_model(cfg, geometry).to(device)
        if cfg.model.grad_checkpointing:
            _enable_grad_checkpointing(self.model)
        self.objective = Objective(cfg.loss, self.model.spec.embed_dim).to(device)
        self.optimizer = build_optimizer(
            [("model", self.model), ("objective", self.objective)],
            lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

        self.step = 0
        self.total_steps = cfg.train.steps
        self.elapsed_before = 0.0
        self.budget_clock: list[float] = []  # seconds since the start of this process's run, after each step
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.counters = DataCounters(cfg.data.max_bad_fraction)
        data_state, rng_state = None, None
        if self.resume_from is not None:
            data_state, rng_state = self._load_resumable()

        forward: torch.nn.Module = TrainForward(self.model)
        if ctx.enabled:
            # NOTE: some configurations leave parameters without gradient, such as the student ViT's final
            # norm, whose output the student never reads. Without find_unused_parameters DDP would never
            # reduce their bucket and would fail on the next step.
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        if cfg.train.compile:
            forward = torch.compile(forward)
        self.runner = StepRunner(
            model=self.model, forward=forward, objective=self.objective, teacher=self.teacher,
            optimizer=self.optimizer, scaler=self.scaler, ctx=ctx, image_mean=self.model.spec.image_mean,
            image_std=self.model.spec.image_std, precision=cfg.train.precision,
            accum_steps=cfg.train.grad_accum_steps, grad_clip=cfg.train.grad_clip,
            inject_teacher=cfg.fusion.enabled and cfg.fusion.injection_source == "teacher",
            second_text=cfg.loss.name == "alip",
        )
        # The teacher view feeds the student and an online teacher; a cache with teacher injection needs none.
        needs_view = geometry is not None and (
            self.model.student_image is not None or self.teacher.needs_teacher_view)
        views = PairedViews(
            image_size=self.model.spec.image_size, mean=self.model.spec.image_mean, std=self.model.spec.image_std,
            teacher_size=geometry.image_size if needs_view else None,
            train=cfg.data.augment and not (self.teacher is not None and self.teacher.needs_center_crop),
            output_uint8=True,
        )
        self.stop_agreed = False  # set when any process got a signal, so all stop after the same step
        self.data = build_train_data(
            cfg.data, transform=views, tokenizer=build_tokenizer(self.model.spec), batch_size=cfg.train.batch_size,
            seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size, state=data_state,
            pin_memory=device.type == "cuda",
        )
        # Restored last: creating the data iterator draws from the torch RNG, as it did in the first run.
        if rng_state is not None:
            restore_rng(rng_state, device)
        num_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("Model: %.2fM trainable parameters; data: %s (%s samples per epoch)", num_params / 1e6,
                    cfg.data.train, self.data.num_samples or "unknown")

    def _load_resumable(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Load ``self.resume_from``; with train.resume=latest, fall back to earlier checkpoints that load.

        Raises:
            RuntimeError: the checkpoint cannot be read (and, for ``latest``, no earlier one can either).
        """
        path = self.resume_from
        _warn_changed_config(path, self.saved_cfg)
        while True:
            try:
                return self._load(path)
            except _LOAD_ERRORS as err:
                earlier = earlier_checkpoint(path)
                if self.cfg.train.resume != "latest" or earlier is None:
                    hint = (f"resume from the earlier checkpoint with --resume {earlier}" if earlier is not None
                            else "no earlier checkpoint is left")
                    raise RuntimeError(f"checkpoint {path} could not be loaded: {err}; {hint}") from err
                logger.warning("Checkpoint %s could not be loaded (%s); resuming from the earlier %s instead",
                               path, err, earlier)
                path = self.resume_from = earlier

    def _load(self, path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        state, rng_states = load_checkpoint(path, model=self.model, objective=self.objective,
                                            optimizer=self.optimizer, scaler=self.scaler)
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed_seconds"])
        self.nonfinite_total = int(state.get("nonfinite_steps", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.counters.load_state_dict(state["counters"])
        saved_steps = int(state["config_steps"])
        self.total_steps = int(state["total_steps"]) if saved_steps == self.cfg.train.steps else self.cfg.train.steps
        if saved_steps != self.cfg.train.steps:
            logger.warning("Resuming with train.steps=%d, but the checkpoint's schedule has %d steps (%d after the "
                           "time budget); the learning-rate schedule changes from here on", self.cfg.train.steps,
                           saved_steps, int(state["total_steps"]))
        data_states = state["data"]
        same_layout = len(data_states) == self.ctx.world_size
        if not same_layout:
            logger.warning("The checkpoint was written by %d processes and this run has %d; each process resumes "
                           "with rank 0's data position and RNG state", len(data_states), self.ctx.world_size)
        index = self.ctx.rank if same_layout else 0
        logger.info("Resumed from %s at step %d of %d", path, self.step, self.total_steps)
        if self.ctx.is_main:
            _truncate_metrics(self.run_dir, self.step)
        return data_states[index], rng_states[index] if len(rng_states) > index else None

    # ---------------------------------------------------------------------------------------------------------------

    def _fit_time_budget(self, steps_this_run: int, started: float) -> None:
        """Fit the schedule to ``train.time_budget_minutes``; end it at this step once the budget is spent.

        The budget covers the whole run, earlier runs of a resumed one included. The step time is measured
        after 8, 16, 32, ... steps of this process as the mean duration of its steps after the first
        (which includes worker start-up), leaving out steps slower than 3 times the median, so that a few
        stalled steps do not shorten the run. The schedule
        is only ever shortened, so the cosine decay still reaches its end, and the run stops at the budget
        in any case. Times are averaged over processes, so every process takes the same decision.
        """
        budget = self.cfg.train.time_budget_minutes
        if budget is None:
            return
        seconds = self.ctx.all_reduce_sum(torch.tensor([time.perf_counter() - started], dtype=torch.float64))
        seconds = float(seconds) / self.ctx.world_size
        elapsed = self.elapsed_before + seconds
        if elapsed > budget * 60:
            logger.info("Time budget of %.1f min spent after %d steps; stopping", budget, self.step)
            self.total_steps = self.step
            return
        self.budget_clock.append(seconds)
        if steps_this_run >= 8 and steps_this_run & (steps_this_run - 1) == 0:
            durations = np.diff(self.budget_clock)
            per_step = float(durations[durations <= 3 * np.median(durations)].mean())
            fitted = max(self.step + 1, self.step + int((budget * 60 - elapsed) / per_step))
            if fitted < self.total_steps:
                logger.info("Time budget %.1f min at %.2f s/step: schedule shortened from %d to %d steps",
                            budget, per_step, self.total_steps, fitted)
                self.total_steps = fitted

    def _agree(self, terms: dict[str, torch.Tensor], counts: torch.Tensor) -> bool:
        """Sum flags and data counts over processes; every process takes the same decision from the sums."""
        flags = torch.tensor([0 if bool(torch.isfinite(terms["loss"])) else 1, int(self.stop.received)])
        total = self.ctx.all_reduce_sum(torch.cat([flags, counts]))
        self.stop_agreed = self.stop_agreed or bool(total[1] > 0)
        self.counters.apply(total[2:])
        return bool(total[0] == 0)

    def _nonfinite(self, terms: dict[str, torch.Tensor]) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        scalars = {k: float(v.detach()) for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1}
        values = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        logger.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row); %s", self.step + 1,
                       self.nonfinite_in_row, values)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss or its gradient was non-finite for {self.nonfinite_in_row} steps in a row, the last at "
                f"step {self.step + 1}; loss terms: {values}. Lower train.lr, use train.precision=fp32 or bf16, "
                "or check the data"
            )

    def _training_state(self, started: float) -> dict[str, Any]:
        data_states = self.ctx.gather_objects(self.data.state_dict())
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "config_steps": self.cfg.train.steps,
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - started,
            "nonfinite_steps": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "counters": self.counters.state_dict(),
            "world_size": self.ctx.world_size,
            "data": data_states,
        }

    def _checkpoint(self, started: float) -> Path | None:
        """Write a resumable checkpoint (collective: every process must call it at the same step)."""
        state = self._training_state(started)
        rng_states = self.ctx.gather_objects(capture_rng(self.ctx.device))
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(self.run_dir, step=self.step, cfg=self.saved_cfg, model=self.model,
                                   objective=self.objective, optimizer=self.optimizer, scaler=self.scaler,
                                   rng_states=rng_states, training_state=state, keep=self.cfg.train.keep_checkpoints)
            logger.info("Checkpoint written: %s", path)
        self.ctx.barrier()
        return path

    def _log(self, writer: MetricsWriter | None, record: dict[str, torch.Tensor], window: dict[str, float]) -> None:
        """Average the step's values over processes and write them (collective at log steps)."""
        names = sorted(record)
        values = torch.stack([record[name].detach().float().reshape(()).cpu() for name in names])
        values = self.ctx.all_reduce_sum(values) / self.ctx.world_size
        if writer is None:
            return
        now = time.perf_counter()
        out = dict(zip(names, values.tolist(), strict=True))
        out.update(
            samples_per_second=window["samples"] / max(1e-9, now - window["start"]),
            data_time=window["data_time"],
            epoch=self.data.batches / self.data.batches_per_epoch if self.data.batches_per_epoch else None,
            nonfinite_steps=self.nonfinite_total,
            **self.counters.metrics(),
        )
        if self.ctx.device.type == "cuda":
            out["memory_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        writer.write(self.step, {k: v for k, v in out.items() if v is not None})

    def _train_on(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Take one optimiser step on ``batch``.

        Returns:
            The step's values to log (loss terms, lr, gradient norm, logit scale, mean gate), or None when
            the loss or the gradient was non-finite and the update was skipped.
        """
        cfg = self.cfg
        counts = self.counters.record(batch)
        seen_terms: dict[str, torch.Tensor] = {}

        def on_loss(terms: dict[str, torch.Tensor]) -> bool:
            seen_terms.update(terms)
            return self._agree(terms, counts)

        result = self.runner.forward_backward(batch, progress=self.step / max(1, self.total_steps), on_loss=on_loss)
        if result is not None:
            terms, outputs = result
            lr = cfg.train.lr * lr_factor(self.step, warmup_steps=cfg.train.warmup_steps, total_steps=self.total_steps,
                                          min_ratio=cfg.train.min_lr_ratio)
            grad_norm, applied = self.runner.apply(lr)
            if applied:
                self.nonfinite_in_row = 0
                record = {k: v.detach() for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1}
                record.update(grad_norm=grad_norm, lr=torch.tensor(lr), logit_scale=outputs["logit_scale"].detach())
                if outputs.get("image_gate") is not None:
                    record["gate_mean"] = outputs["image_gate"].detach().float().mean()
                return record
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite(seen_terms)
        return None

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.train.tensorboard) if ctx.is_main else None
        started = time.perf_counter()
        window = {"start": started, "samples": 0.0, "data_time": 0.0}
        preempted = False
        steps_this_run = 0
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not ctx.is_main, desc="train",
                        unit="step", dynamic_ncols=True)
        self.model.train()
        self.objective.train()
        try:
            while self.step < self.total_steps:
                fetch_start = time.perf_counter()
                batch = next(self.data)
                window["data_time"] += time.perf_counter() - fetch_start
                record = self._train_on(batch)
                if record is not None:
                    self.step += 1
                    steps_this_run += 1
                    window["samples"] += batch["image"].shape[0] * ctx.world_size
                    progress.update(1)
                    self._fit_time_budget(steps_this_run, started)
                    progress.total = self.total_steps
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        self._log(writer, record, window)
                        progress.set_postfix(loss=f"{float(record['loss']):.3f}", lr=f"{float(record['lr']):.2e}")
                        window = {"start": time.perf_counter(), "samples": 0.0, "data_time": 0.0}
                    every = cfg.train.checkpoint_every
                    if every and (self.step % every == 0 or self.step == self.total_steps):
                        self._checkpoint(started)  # the last one lets a later run extend the schedule
                if self.stop_agreed and self.step < self.total_steps:
                    path = self._checkpoint(started)
                    logger.warning("Stopped at step %d on a signal; resume with train.resume=latest%s", self.step,
                                   f" (checkpoint {path})" if path else "")
                    preempted = True
                    break
        finally:
            progress.close()
            self.data.close()
            if writer is not None:
                writer.close()

        summary: dict[str, Any] = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "seconds": self.elapsed_before + time.perf_counter() - started,
            "nonfinite_steps": self.nonfinite_total,
            "preempted": preempted,
            # None when another process of the job got the signal; the CLI exits with 130 after SIGINT.
            "stop_signal": self.stop.signal_name if preempted else None,
            "run_dir": str(self.run_dir),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            **self.counters.metrics(),
        }
        if ctx.is_main and not preempted:
            save_model(self.run_dir / "model.safetensors", self.model, self.saved_cfg)
            summary.update(git_sha=_git_sha(), world_size=ctx.world_size, num_samples=self.data.num_samples)
            write_json(self.run_dir / "training_state.json", summary)
            logger.info("Finished %d steps in %.1f s; model saved to %s", self.step, summary["seconds"],
                        self.run_dir / "model.safetensors")
        return summary
