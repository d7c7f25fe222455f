"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

``<run>/checkpoints/step-NNNNNNNN/`` contains

* ``model.safetensors``: the model, in the same format as the run's final file (no teacher tensors);
* ``objective.safetensors``: the objective's parameters and buffers (ranking transition heads, ALIP's
  running means);
* ``trainer.pt``: optimiser and gradient-scaler state, and every process's RNG states (Python, NumPy,
  torch, CUDA), stored as tensors and plain lists so that ``torch.load(weights_only=True)`` reads it;
* ``training_state.json``: step, schedule, elapsed time, counters and every process's data position.

The folder is written under a temporary name and renamed when complete, so a process killed while
saving (even by SIGKILL) leaves only a ``.tmp-*`` folder that :func:`find_latest` ignores and the next
save removes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config
from .checkpoint import clean_state_dict, save_model, write_json

__all__ = [
    "CHECKPOINT_FILES",
    "capture_rng",
    "earlier_checkpoint",
    "find_latest",
    "load_checkpoint",
    "resolve_resume",
    "restore_rng",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("model.safetensors", "objective.safetensors", "trainer.pt", "training_state.json")
_NAME = re.compile(r"^step-(\d+)$")


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Return this process's Python, NumPy, torch and CUDA RNG states as tensors and plain lists."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the RNG states saved by :func:`capture_rng`."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def _complete(path: Path) -> bool:
    return path.is_dir() and _step_of(path) is not None and all((path / name).is_file() for name in CHECKPOINT_FILES)


def find_latest(run_dir: str | Path) -> Path | None:
    """Return the newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    complete = [path for path in root.iterdir() if _complete(path)]
    return max(complete, key=_step_of) if complete else None


def earlier_checkpoint(path: str | Path) -> Path | None:
    """Return the newest complete checkpoint of the same run that is older than ``path``, or None."""
    path = Path(path)
    step = _step_of(path)
    if step is None or not path.parent.is_dir():
        return None
    older = [p for p in path.parent.iterdir() if _complete(p) and (_step_of(p) or 0) < step]
    return max(older, key=lambda p: _step_of(p) or 0) if older else None


def resolve_resume(spec: str | None, run_dir: str | Path) -> Path | None:
    """Turn ``train.resume`` into a checkpoint folder.

    ``latest`` gives the newest complete checkpoint of ``run_dir``, or None when there is none yet (so
    the same command starts a run and continues it after preemption). A path may name a checkpoint
    folder or a run folder (its newest checkpoint).

    Raises:
        FileNotFoundError: a path that contains no complete checkpoint.
    """
    if spec is None:
        return None
    if spec == "latest":
        return find_latest(run_dir)
    path = Path(spec)
    if _complete(path):
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(
            f"train.resume={spec!r} is not a complete checkpoint folder (with {', '.join(CHECKPOINT_FILES)}) "
            "nor a run folder with checkpoints; use train.resume=latest or a checkpoints/step-N folder"
        )
    return latest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    cfg: Config,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rng_states: list[dict[str, Any]],
    training_state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write a complete checkpoint folder atomically and prune old ones (called on rank 0 only).

    Args:
        run_dir: the run folder.
        step: optimiser steps done.
        cfg: the run's config (stored in the model file's metadata).
        model: the unwrapped model.
        objective: the loss module.
        optimizer, scaler: optimiser and gradient scaler.
        rng_states: :func:`capture_rng` of every process, in rank order.
        training_state: JSON-serialisable trainer state (step, schedule, counters, data positions).
        keep: newest checkpoints to keep (0 keeps all).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if _complete(final):
        return final  # the same step was saved already (a stop signal right after a periodic save)
    for stale in root.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while saving
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(tmp / "model.safetensors", model, cfg)
        objective_state = clean_state_dict(objective.state_dict())
        objective_state = {k: v.detach().to("cpu").contiguous() for k, v in objective_state.items()}
        save_file(objective_state, str(tmp / "objective.safetensors"))
        trainer = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states}
        torch.save(trainer, tmp / "trainer.pt")
        for name in ("objective.safetensors", "trainer.pt"):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        write_json(tmp / "training_state.json", training_state)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        complete = sorted((path for path in root.iterdir() if _complete(path)), key=_step_of)
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load a checkpoint folder into the given objects.

    Returns:
        (training_state, rng_states per process).

    Raises:
        RuntimeError: the weights do not match the model or the objective (keys listed).
    """
    path = Path(path)
    model_state = clean_state_dict(load_file(str(path / "model.safetensors")))
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: model weights do not match this config; missing {missing}, unexpected {unexpected}"
        )
    objective_state = clean_state_dict(load_file(str(path / "objective.safetensors")))
    missing, unexpected = objective.load_state_dict(objective_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: objective state does not match loss config; missing {missing}, unexpected {unexpected}"
        )
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scaler.load_state_dict(trainer["scaler"])
    training_state = json.loads((path / "training_state.json").read_text())
    return training_state, trainer["rng"]
