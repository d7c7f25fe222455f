"""Training loop: AdamW, warm-up + cosine, logit-scale clamp, gradient clipping, autocast, metrics, checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..data.counters import BadDataError, DataCounters
from ..data.csv_dataset import CaptionDataset
from ..data.loader import ResumableBatchSampler, build_train_loader
from ..data.transforms import PairedViews
from ..losses import Objective
from ..models.dinorankclip import build_model
from ..models.trunk import build_tokenizer
from .checkpoint import save_model, write_json
from .distributed import DistributedContext, init_distributed
from .metrics import MetricsWriter
from .optim import build_optimizer, lr_factor
from .teacher_source import build_teacher_source

__all__ = ["BadDataError", "NonFiniteLossError", "seed_everything", "train"]

logger = logging.getLogger(__name__)


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


def _autocast(device: torch.device, precision: str):
    """Autocast context for ``train.precision``; auto means bf16 on CUDA and fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _check_config(cfg: Config) -> None:
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give a CSV/TSV with filepath,caption columns (data.train=FILE)")
    if cfg.loss.name == "alip" and not cfg.data.second_caption_column:
        raise ConfigError(
            "loss.name=alip needs a second caption per image; set data.second_caption_column=<column> "
            "(a synthetic caption, or another human caption at toy scale)"
        )


def train(cfg: Config) -> dict[str, Any]:
    """Train a model as configured and write the run folder ``cfg.train.output_dir``.

    Returns:
        A summary with ``run_dir``, ``steps``, ``seconds`` and the data counters.
    """
    _check_config(cfg)
    ctx = init_distributed(cfg.train.device)
    device = ctx.device
    run_dir = Path(cfg.train.output_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    seed_everything(cfg.train.seed)

    teacher, geometry = build_teacher_source(cfg, device)
    model = build_model(cfg, geometry).to(device)
    objective = Objective(cfg.loss, model.spec.embed_dim).to(device)
    tokenizer = build_tokenizer(model.spec)
    views = PairedViews(
        image_size=model.spec.image_size,
        mean=model.spec.image_mean,
        std=model.spec.image_std,
        teacher_size=geometry.image_size if geometry is not None else None,
        train=cfg.data.augment,
    )
    dataset = CaptionDataset(
        cfg.data.train,
        transform=views,
        tokenizer=tokenizer,
        filepath_column=cfg.data.filepath_column,
        caption_column=cfg.data.caption_column,
        second_caption_column=cfg.data.second_caption_column,
        separator=cfg.data.separator,
        exif_transpose=cfg.data.exif_transpose,
    )
    sampler = ResumableBatchSampler(
        len(dataset), cfg.train.batch_size, seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
    )
    loader = build_train_loader(dataset, sampler, num_workers=cfg.data.num_workers,
                                pin_memory=device.type == "cuda")
    optimizer = build_optimizer(
        [("model", model), ("objective", objective)],
        lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
    )
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model: %.2fM trainable parameters; data: %d pairs from %s", num_params / 1e6, len(dataset),
                cfg.data.train)

    writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard) if ctx.is_main else None
    counters = DataCounters(cfg.data.max_bad_fraction)
    loop = _Loop(cfg, ctx, model, objective, teacher, optimizer, writer, counters)
    try:
        summary = loop.run(iter(loader), batches_per_epoch=sampler.batches_per_epoch)
    finally:
        if writer is not None:
            writer.close()
    if ctx.is_main:
        save_model(run_dir / "model.safetensors", model, cfg)
        summary.update(run_dir=str(run_dir), git_sha=_git_sha(), samples_seen=counters.seen,
                       samples_skipped=counters.bad, dataset_size=len(dataset))
        write_json(run_dir / "training_state.json", summary)
        logger.info("Finished %d steps in %.1f s; model saved to %s", summary["steps"], summary["seconds"],
                    run_dir / "model.safetensors")
    return summary


class _Loop:
    """One training run's step loop; kept separate so the set-up above stays readable."""

    def __init__(self, cfg, ctx: DistributedContext, model, objective, teacher, optimizer, writer, counters):
        self.cfg = cfg
        self.ctx = ctx
        self.model = model
        self.objective = objective
        self.teacher = teacher
        self.optimizer = optimizer
        self.writer = writer
        self.counters = counters
        self.total_steps = cfg.train.steps
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._first_step_end = 0.0

    def _fit_time_budget(self, step: int, started: float) -> bool:
        """Fit the schedule to ``train.time_budget_minutes``; return False once the budget is spent.

        The step time is measured at steps 8, 16, 32, ... (excluding the first step, which includes worker
        start-up) and the schedule is only ever shortened, so the cosine decay still reaches its end.
        """
        budget = self.cfg.train.time_budget_minutes
        if budget is None:
            return True
        elapsed = time.perf_counter() - started
        if elapsed > budget * 60:
            logger.info("Time budget of %.1f min spent after %d steps; stopping", budget, step)
            self.total_steps = step
            return False
        if step == 1:
            self._first_step_end = elapsed
        if step >= 8 and step & (step - 1) == 0:
            per_step = (elapsed - self._first_step_end) / (step - 1)
            fitted = max(step + 1, int((budget * 60 - elapsed) / per_step) + step)
            if fitted < self.total_steps:
                logger.info("Time budget %.1f min at %.2f s/step: schedule shortened from %d to %d steps",
                            budget, per_step, self.total_steps, fitted)
                self.total_steps = fitted
        return True

    def step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor] | None:
        cfg, device = self.cfg, self.ctx.device
        factor = lr_factor(step, warmup_steps=cfg.train.warmup_steps, total_steps=self.total_steps,
                           min_ratio=cfg.train.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.train.lr * factor
        image = batch["image"].to(device, non_blocking=True)
        text = batch["text"].to(device, non_blocking=True)
        teacher_view = batch["teacher_view"].to(device, non_blocking=True) if "teacher_view" in batch else None
        with _autocast(device, cfg.train.precision):
            teacher_out = self.teacher(batch) if self.teacher is not None else None
            inject_teacher = teacher_out is not None and cfg.fusion.injection_source == "teacher"
            levels = teacher_out.patch_levels if inject_teacher else None
            outputs = self.model(image, text, teacher_view, levels)
            if "text2" in batch:
                # ALIP's second caption per image goes through the text side only.
                text2 = batch["text2"].to(device, non_blocking=True)
                outputs["second_text_features"] = self.model.encode_text_all(text2)["text_features"]
            terms = self.objective(outputs, teacher_out, progress=step / max(1, self.total_steps), batch=batch)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        loss.backward()
        clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        record = {name: value.detach() for name, value in terms.items() if torch.is_tensor(value)}
        record["grad_norm"] = grad_norm.detach()
        record["lr"] = torch.tensor(cfg.train.lr * factor)
        record["logit_scale"] = outputs["logit_scale"].detach()
        if outputs.get("image_gate") is not None:
            record["gate_mean"] = outputs["image_gate"].detach().float().mean()
        return record

    def run(self, batches, *, batches_per_epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        self.objective.train()
        started = time.perf_counter()
        window_start, window_samples, data_time = started, 0, 0.0
        nonfinite_in_row, nonfinite_total = 0, 0
        progress = tqdm(total=self.total_steps, disable=not self.ctx.is_main, desc="train", unit="step",
                        dynamic_ncols=True)
        step = 0
        while step < self.total_steps:
            fetch_start = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - fetch_start
            self.counters.update(batch)
            if "image" not in batch:  # every sample of this batch was unreadable
                continue
            if not self._fit_time_budget(step, started):
                break
            progress.total = self.total_steps
            record = self.step(batch, step)
            if record is None:
                nonfinite_in_row += 1
                nonfinite_total += 1
                logger.warning("Step %d: non-finite loss, update skipped (%d in a row)", step, nonfinite_in_row)
                if nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"the loss was non-finite for {nonfinite_in_row} steps in a row (last at step {step}); "
                        "lower train.lr or check the data"
                    )
                continue
            nonfinite_in_row = 0
            window_samples += batch["image"].shape[0] * self.ctx.world_size
            step += 1
            progress.update(1)
            if self.writer is not None and (step % cfg.train.log_every == 0 or step == self.total_steps):
                now = time.perf_counter()
                values = {k: float(v) for k, v in record.items()}
                values.update(
                    samples_per_second=window_samples / max(1e-9, now - window_start),
                    data_time=data_time,
                    epoch=step / max(1, batches_per_epoch),
                    samples_skipped=self.counters.bad,
                    nonfinite_steps=nonfinite_total,
                )
                self.writer.write(step, values)
                progress.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
                window_start, window_samples, data_time = now, 0, 0.0
        progress.close()
        return {"steps": step, "total_steps": self.total_steps, "seconds": time.perf_counter() - started,
                "nonfinite_steps": nonfinite_total}
