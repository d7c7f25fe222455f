"""Forward and backward passes of one optimiser step: device transfer, autocast, DDP and gradient
accumulation that keeps the whole contrastive batch.

With ``train.grad_accum_steps = M`` the local batch is cut into M micro-batches. As in open_clip's
``accum_freq``, a first pass without gradient encodes every micro-batch and caches all model outputs.
Then, for each micro-batch i, the model runs again with gradient and its outputs replace the cached
ones at position i. The loss therefore always covers the whole batch, and the backward pass adds
micro-batch i's share of the gradient. Three details make the sum equal to the gradient of one big batch:

* the torch RNG state of each micro-batch's first pass is restored before its second pass, so random
  layers (dropout, drop-path) draw the same masks;
* the logit scale, the objective's parameters (ranking transition heads) and its buffers (ALIP's
  running means) depend on no micro-batch, so only the last pass uses them live; earlier passes use
  detached copies and a copy of the buffers as they were before the step, so every pass computes the
  same loss, the buffers move once per step and those gradients are counted once;
* DDP synchronises gradients only in the last backward pass (``no_sync`` before it).

NOTE: BatchNorm layers (the RN50 trunk) normalise with micro-batch statistics and update their running
statistics in both passes, so with them accumulation is close to, not equal to, one big batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..data.transforms import normalize_images
from .distributed import DistributedContext

__all__ = ["StepRunner", "TrainForward", "autocast_context"]


def autocast_context(device: torch.device, precision: str):
    """Autocast context for ``train.precision``; auto means bf16 on CUDA and fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class TrainForward(nn.Module):
    """The model's training forward pass as one module, so DDP and ``torch.compile`` can wrap it.

    Adds ``second_text_features`` (the second caption's embedding, for ALIP) when ``text2`` is given.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image, text, teacher_view=None, teacher_levels=None, text2=None) -> dict[str, Any]:
        outputs = self.model(image, text, teacher_view, teacher_levels)
        if text2 is not None:
            outputs["second_text_features"] = self.model.encode_text(text2)
        return outputs


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-micro-batch values along the batch dimension (tensors, tuples of tensors)."""
    first = parts[0]
    if first is None:
        return None
    if torch.is_tensor(first):
        return first if first.ndim == 0 else torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[k] for p in parts]) for k in range(len(first)))
    return first


def _concat_teacher(parts: list[Any]) -> Any:
    if parts[0] is None:
        return None
    if not dataclasses.is_dataclass(parts[0]):
        raise TypeError(f"teacher features of type {type(parts[0]).__name__} cannot be joined across micro-batches")
    fields = {f.name: _concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0])}
    return type(parts[0])(**fields)


class StepRunner:
    """Run the forward and backward passes of a step, then the optimiser update.

    Args:
        model: the unwrapped model (for the logit-scale clamp).
        forward: :class:`TrainForward` of ``model``, possibly inside DDP and ``torch.compile``.
        objective: the loss module (not inside DDP: its gradients are averaged here).
        teacher: callable from a batch dict (device tensors, ``teacher_view`` in [0, 1]) to teacher
            features, or None.
        optimizer: over the model's and the objective's parameters.
        scaler: ``torch.amp.GradScaler`` (enabled for fp16 only).
        ctx: distributed context.
        image_mean, image_std: trunk normalisation, applied on the device to uint8 batches.
        precision: ``train.precision``.
        accum_steps: micro-batches per step.
        grad_clip: max gradient norm (None: no clipping).
        inject_teacher: pass the teacher's patch levels to the model (``fusion.injection_source=teacher``).
        second_text: encode the batch's second caption (``text2``, for ALIP).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        forward: nn.Module,
        objective: nn.Module,
        teacher: Callable | None,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        ctx: DistributedContext,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        precision: str = "auto",
        accum_steps: int = 1,
        grad_clip: float | None = None,
        inject_teacher: bool = False,
        second_text: bool = False,
    ) -> None:
        self.model = model
        self.forward = forward
        self.objective = objective
        self.teacher = teacher
        self.optimizer = optimizer
        self.scaler = scaler
        self.ctx = ctx
        self.mean, self.std = image_mean, image_std
        self.precision = precision
        self.accum_steps = accum_steps
        self.grad_clip = grad_clip
        self.inject_teacher = inject_teacher
        self.second_text = second_text
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.objective_params = [p for p in objective.parameters() if p.requires_grad]
        self.gather = ctx.feature_gather

    # ---------------------------------------------------------------------------------------------------------------
    # Inputs

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move tensors to the device; uint8 images become normalised floats, the teacher view [0, 1]."""
        device = self.ctx.device
        out = dict(batch)
        for key, value in batch.items():
            if torch.is_tensor(value):
                out[key] = value.to(device, non_blocking=True)
        if out["image"].dtype == torch.uint8:
            out["image"] = normalize_images(out["image"], self.mean, self.std)
        if out.get("teacher_view") is not None and out["teacher_view"].dtype == torch.uint8:
            out["teacher_view"] = out["teacher_view"].float().div_(255.0)
        return out

    def _split(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        rows = batch["image"].shape[0]
        if rows % self.accum_steps:
            raise ValueError(
                f"the local batch of {rows} samples does not split into train.grad_accum_steps="
                f"{self.accum_steps} equal micro-batches; make train.batch_size divisible by "
                "processes × grad_accum_steps"
            )
        size = rows // self.accum_steps
        parts = []
        for i in range(self.accum_steps):
            part = {}
            for key, value in batch.items():
                sliceable = (torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == rows) or (
                    isinstance(value, list) and len(value) == rows)
                part[key] = value[i * size:(i + 1) * size] if sliceable else value
            parts.append(part)
        return parts

    def _model_inputs(self, batch: dict[str, Any], teacher_out: Any) -> dict[str, Any]:
        levels = teacher_out.patch_levels if (teacher_out is not None and self.inject_teacher) else None
        return {"image": batch["image"], "text": batch["text"], "teacher_view": batch.get("teacher_view"),
                "teacher_levels": levels, "text2": batch.get("text2") if self.second_text else None}

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.ctx.device)

    # ---------------------------------------------------------------------------------------------------------------
    # Passes

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _objective_frozen(self, outputs, teacher_out, *, progress, batch, buffers) -> dict[str, torch.Tensor]:
        """Call the objective with detached parameters and a copy of ``buffers`` (earlier micro-batches)."""
        state = {name: p.detach() for name, p in self.objective.named_parameters()}
        state.update({name: b.clone() for name, b in buffers.items()})
        return functional_call(self.objective, state, (outputs, teacher_out),
                               {"progress": progress, "batch": batch, "dist": self.gather})

    def forward_backward(
        self, batch: dict[str, Any], *, progress: float, on_loss: Callable[[dict[str, torch.Tensor]], bool]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Compute the loss of ``batch`` and accumulate its gradient in ``.grad``.

        Args:
            batch: a collated batch of this process (CPU tensors).
            progress: step / total steps, for the ranking-weight ramp.
            on_loss: called once with the loss terms before any backward pass; returning False skips the
                step (no gradient is computed). Collective decisions (non-finite loss on any process)
                belong there, since every process must take the same branch.

        Returns:
            (loss terms, model outputs of the last pass), or None when ``on_loss`` returned False.
        """
        inputs = self.to_device(batch)
        context = autocast_context(self.ctx.device, self.precision)
        if self.accum_steps == 1:
            with context:
                teacher_out = self.teacher(inputs) if self.teacher is not None else None
                outputs = self.forward(**self._model_inputs(inputs, teacher_out))
                terms = self.objective(outputs, teacher_out, progress=progress, batch=inputs, dist=self.gather)
            if not on_loss(terms):
                return None
            self._backward(terms["loss"])
            self._average_objective_grads()
            return terms, outputs

        parts = self._split(inputs)
        rng_states, cached, teacher_parts = [], [], []
        with torch.no_grad(), context:
            for part in parts:
                rng_states.append(self._rng_state())
                teacher_out = self.teacher(part) if self.teacher is not None else None
                teacher_parts.append(teacher_out)
                cached.append(_detach(self.forward(**self._model_inputs(part, teacher_out))))
        teacher_full = _concat_teacher(teacher_parts)
        buffers = {name: b.detach().clone() for name, b in self.objective.named_buffers()}
        last = self.accum_steps - 1
        terms: dict[str, torch.Tensor] = {}
        outputs: dict[str, Any] = {}
        for i, part in enumerate(parts):
            self._set_rng_state(rng_states[i])
            sync = i == last or not hasattr(self.forward, "no_sync")
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                with context:
                    live = self.forward(**self._model_inputs(part, teacher_parts[i]))
                    outputs = {}
                    for key, value in live.items():
                        if torch.is_tensor(value) and value.ndim == 0:  # the logit scale: live in the last pass
                            outputs[key] = value if i == last else cached[i][key]
                        else:
                            outputs[key] = _concat([value if j == i else cached[j][key] for j in range(len(parts))])
                    if i != last:
                        terms = self._objective_frozen(outputs, teacher_full, progress=progress, batch=inputs,
                                                       buffers=buffers)
                    else:
                        terms = self.objective(outputs, teacher_full, progress=progress, batch=inputs,
                                               dist=self.gather)
                if i == 0 and not on_loss(terms):
                    return None
                self._backward(terms["loss"])
        self._average_objective_grads()
        return terms, outputs

    def _average_objective_grads(self) -> None:
        """Average the objective's gradients over processes (DDP does this for the model's)."""
        if not self.ctx.enabled or not self.objective_params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.objective_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.ctx.all_reduce_sum(flat) / self.ctx.world_size
        offset = 0
        for param in self.objective_params:
            count = param.numel()
            param.grad = flat[offset:offset + count].view_as(param).clone()
            offset += count

    def apply(self, lr: float) -> tuple[torch.Tensor, bool]:
        """Clip, step the optimiser at learning rate ``lr``, clear gradients and clamp the logit scale.

        Returns:
            (gradient norm before clipping as a 0-dim tensor, whether the update was applied). With fp16
            the scaler itself skips an update whose gradients overflowed and lowers its scale. That is
            the scaler's normal operation, so it returns True. Without fp16 a non-finite norm skips the
            update.
            After DDP every process holds the same gradients, so all processes decide alike.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        clip = self.grad_clip if self.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        applied = self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
        if applied:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        return grad_norm.detach(), applied
