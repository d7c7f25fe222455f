"""All-gather with gradient for losses that score local rows against global columns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FeatureGather", "all_gather_with_grad"]


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0, with a backward pass that sums over ranks.

    Rank r's input receives Σ_ranks d(loss_rank)/d(gathered[r]), which is the gradient of the sum of
    the per-rank losses. gloo has no reduce-scatter, so the backward pass all-reduces the whole
    gradient and keeps this rank's slice; NCCL uses reduce-scatter.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty(ctx.rows, *grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
            return out, None
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """Return [world_size·B, ...]: every rank's [B, ...] tensor in rank order, differentiable.

    Every rank must pass the same shape.
    """
    return _AllGather.apply(tensor, group)


@dataclass(frozen=True)
class FeatureGather:
    """Distributed context for the losses: the process group and this rank's place in it.

    Attributes:
        group: process group (None: the default group).
    """

    group: object | None = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def gather(self, tensor: Tensor) -> Tensor:
        """Return the differentiable concatenation of every rank's ``tensor`` along dim 0."""
        return all_gather_with_grad(tensor, self.group)

    def row_offset(self, local_rows: int) -> int:
        """Return the global index of this rank's first row when every rank has ``local_rows`` rows."""
        return self.rank * local_rows
