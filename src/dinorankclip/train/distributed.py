"""Process-group set-up for single-process, ``torchrun`` and SLURM ``srun`` launches, and the few
collectives the trainer needs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..losses import FeatureGather

__all__ = ["DistributedContext", "init_distributed", "resolve_device"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Position of this process in the job: rank, world size, local rank, device and launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"  # single, torchrun or slurm
    owns_group: bool = False  # whether init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def feature_gather(self) -> FeatureGather | None:
        """The losses' all-gather context (None in a single process)."""
        return FeatureGather() if self.enabled else None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the sum of ``tensor`` over all processes (the tensor itself in a single process).

        The reduction runs on this process's device, as NCCL needs.
        """
        if not self.enabled:
            return tensor
        reduced = tensor.to(self.device)
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Return every process's ``obj`` in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0, *, option: str = "train.device=") -> torch.device:
    """Turn a device name (auto, cpu, cuda, cuda:N) into a device; auto picks CUDA when present.

    ``option`` is how the user sets the name (``train.device=`` or ``--device``), for the error message.
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    sep = "" if option.endswith("=") else " "
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option}{sep}{name} is invalid; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}{sep}{name} is invalid: CUDA is not available; use {option}{sep}cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def detect_launcher() -> tuple[str, int, int, int]:
    """Return (launcher, rank, world size, local rank) from the environment.

    ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK, and wins when both are present (``srun torchrun``
    with one task per node). SLURM's ``srun`` sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun", _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1, _env_int("LOCAL_RANK") or 0
    if "SLURM_PROCID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm", _env_int("SLURM_PROCID") or 0, _env_int("SLURM_NTASKS") or 1, _env_int("SLURM_LOCALID") or 0
    return "single", 0, 1, 0


def init_distributed(device_name: str = "auto") -> DistributedContext:
    """Detect the launcher and, for more than one process, initialise the default process group.

    Under SLURM without torchrun, MASTER_ADDR (the first node's host name) and MASTER_PORT must be
    exported by the job script. NCCL is used on CUDA devices and gloo on CPU.

    Raises:
        RuntimeError: a multi-process launch without MASTER_ADDR or MASTER_PORT.
    """
    launcher, rank, world_size, local_rank = detect_launcher()
    device = resolve_device(device_name, local_rank)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"{name} is not set for a {world_size}-process {launcher} job; launch with torchrun, or export "
                    "MASTER_ADDR (first node's host name, e.g. from scontrol show hostnames) and MASTER_PORT "
                    "in the SLURM script"
                )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns_group = True
        logger.info("Process group ready (%s): rank %d of %d, backend %s, device %s", launcher, rank, world_size,
                    backend, device)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                              launcher=launcher, owns_group=owns_group)
