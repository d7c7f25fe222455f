"""Gradients of one training step on a fixed global batch, in one process or under torchrun.

Usage: ``python ddp_gradient_worker.py OUT.pt CASE [CASE ...]`` where CASE is ``NAME:ACCUM:OVERRIDES``
(overrides separated by ``|``). Every process takes its contiguous share of the same global batch,
runs the trainer's StepRunner (all-gather of features, DDP, micro-batches) and rank 0 saves the
gradients of the model and the objective, per case, to OUT.pt.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import SAMPLE_DATA, TINY_OVERRIDES  # noqa: E402

from dinorankclip.config import load_config  # noqa: E402
from dinorankclip.data.csv_dataset import CaptionDataset, collate_samples  # noqa: E402
from dinorankclip.data.transforms import PairedViews  # noqa: E402
from dinorankclip.losses import Objective  # noqa: E402
from dinorankclip.models.dinorankclip import build_model  # noqa: E402
from dinorankclip.models.trunk import build_tokenizer  # noqa: E402
from dinorankclip.train.distributed import DistributedContext, init_distributed  # noqa: E402
from dinorankclip.train.optim import build_optimizer  # noqa: E402
from dinorankclip.train.step import StepRunner, TrainForward  # noqa: E402
from dinorankclip.train.teacher_source import build_teacher_source  # noqa: E402
from dinorankclip.train.trainer import _enable_grad_checkpointing, seed_everything  # noqa: E402

GLOBAL_BATCH = 8


def step_gradients(ctx, accum: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = load_config(None, TINY_OVERRIDES + overrides + [f"train.grad_accum_steps={accum}"])
    seed_everything(0)
    teacher, geometry = build_teacher_source(cfg, ctx.device)
    model = build_model(cfg, geometry)
    if cfg.model.grad_checkpointing:
        _enable_grad_checkpointing(model)
    objective = Objective(cfg.loss, model.spec.embed_dim)
    optimizer = build_optimizer([("model", model), ("objective", objective)], lr=1e-3, weight_decay=0.1,
                                betas=(0.9, 0.98), eps=1e-6)
    forward = TrainForward(model)
    if ctx.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(forward, find_unused_parameters=True)
    runner = StepRunner(model=model, forward=forward, objective=objective, teacher=teacher, optimizer=optimizer,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), ctx=ctx, image_mean=model.spec.image_mean,
                        image_std=model.spec.image_std, precision="fp32", accum_steps=accum,
                        second_text=cfg.loss.name == "alip")
    views = PairedViews(image_size=model.spec.image_size, mean=model.spec.image_mean, std=model.spec.image_std,
                        teacher_size=geometry.image_size if geometry is not None else None, train=True,
                        output_uint8=True)
    dataset = CaptionDataset(SAMPLE_DATA / "flickr8k" / "train_pairs.csv", transform=views,
                             tokenizer=build_tokenizer(model.spec),
                             second_caption_column=cfg.data.second_caption_column)
    local = GLOBAL_BATCH // ctx.world_size
    rows = range(ctx.rank * local, (ctx.rank + 1) * local)
    batch = collate_samples([dataset[(5 * i, 1000 + i)] for i in rows])
    model.train()
    objective.train()
    result = runner.forward_backward(batch, progress=1.0, on_loss=lambda terms: True)
    assert result is not None
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"objective.{n}": p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    grads["loss"] = ctx.all_reduce_sum(result[0]["loss"].detach().reshape(1)) / ctx.world_size
    grads.update({f"buffer.{n}": b.clone() for n, b in objective.named_buffers()})
    return grads


@functools.cache
def single_process_gradients(accum: int, overrides: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``step_gradients`` in this process (no process group), computed once per test session."""
    return step_gradients(DistributedContext(), accum, list(overrides))


def main() -> None:
    out = Path(sys.argv[1])
    ctx = init_distributed("cpu")
    results = {}
    for case in sys.argv[2:]:
        name, accum, overrides = case.split(":", 2)
        results[name] = step_gradients(ctx, int(accum), [o for o in overrides.split("|") if o])
    if ctx.is_main:
        torch.save(results, out)
    ctx.shutdown()


if __name__ == "__main__":
    main()
