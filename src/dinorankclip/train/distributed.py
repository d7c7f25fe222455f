"""Process-group set-up for single-process, ``torchrun`` and SLURM ``srun`` launches."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_distributed", "resolve_device"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Turn ``train.device`` (auto, cpu, cuda, cuda:N) into a device; auto picks CUDA when present."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed(device_name: str = "auto") -> DistributedContext:
    """Detect the launcher and, for more than one process, initialise the default process group.

    ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; SLURM's ``srun`` sets SLURM_PROCID, SLURM_NTASKS
    and SLURM_LOCALID (then MASTER_ADDR and MASTER_PORT must be exported by the job script). NCCL is used
    on CUDA devices and gloo on CPU.
    """
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"{name} is not set for a {world_size}-process job; launch with torchrun, or export "
                    "MASTER_ADDR (first node's host name) and MASTER_PORT in the SLURM script"
                )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.info("Process group ready: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
