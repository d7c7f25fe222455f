"""Measure the training cost of the study runs at CC3M scale: FLOPs per sample and CPU time per step.

For each run type (DinoRankCLIP with fusion; the trunk alone as in the CLIP baselines) this script builds
the model of a config preset (default ``rn50-cc3m``: RN50 trunk at 224 px, DINOv3 ViT-B/16 teacher,
ViT-Tiny student), runs training steps on real Flickr8k images from the bundled data and reports:

* FLOPs per sample of one training step (teacher forward, model forward and backward, objective), counted
  with ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications and convolutions);
* the objective's FLOPs alone at the real global batch (1024 pairs, random unit embeddings), since the
  ranking loss grows with the batch;
* single-thread CPU seconds per step (``time.process_time``), after one warm-up step.

The teacher has random weights (no DINOv3 file is needed): its cost does not depend on the values.

Usage:
    PYTHONPATH=src python benchmarks/study_cost.py --batch 8 --steps 3 --out cost.json
    PYTHONPATH=src python benchmarks/study_cost.py --config tiny-cpu --batch 128 --steps 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinorankclip.config import load_config
from dinorankclip.data.csv_dataset import CaptionDataset, collate_samples
from dinorankclip.data.transforms import PairedViews
from dinorankclip.eval.bundled import bundled_train_pairs
from dinorankclip.losses import Objective
from dinorankclip.models.dinorankclip import build_model
from dinorankclip.models.trunk import build_tokenizer
from dinorankclip.train.optim import build_optimizer
from dinorankclip.train.teacher_source import build_teacher_source

RUN_TYPES = {
    "dinorankclip_full": ["loss.name=dinorankclip", "loss.order=3", "fusion.variant=full"],
    "dinorankclip_order4": ["loss.name=dinorankclip", "loss.order=4", "fusion.variant=full"],
    "clip_trunk_only": ["loss.name=clip", "loss.order=null", "fusion.variant=none"],
}


def _batch(cfg, model, geometry, batch_size: int) -> dict:
    views = PairedViews(image_size=model.spec.image_size, mean=model.spec.image_mean, std=model.spec.image_std,
                        teacher_size=geometry.image_size if geometry is not None else None, train=True)
    data = CaptionDataset(bundled_train_pairs(), transform=views, tokenizer=build_tokenizer(model.spec))
    return collate_samples([data[(i, i)] for i in range(batch_size)])


def _step(model, objective, teacher, optimizer, batch) -> None:
    teacher_out = teacher(batch) if teacher is not None else None
    outputs = model(batch["image"], batch["text"], batch.get("teacher_view"), None)
    loss = objective(outputs, teacher_out, progress=0.5)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(run_type: str, *, config: str, batch_size: int, steps: int, global_batch: int) -> dict:
    cfg = load_config(config, ["teacher.weights=random", "train.device=cpu", *RUN_TYPES[run_type]])
    torch.manual_seed(0)
    teacher, geometry = build_teacher_source(cfg, torch.device("cpu"))
    model = build_model(cfg, geometry)
    objective = Objective(cfg.loss, model.spec.embed_dim)
    optimizer = build_optimizer([("model", model), ("objective", objective)], lr=1e-4, weight_decay=0.1,
                                betas=(0.9, 0.98), eps=1e-6)
    batch = _batch(cfg, model, geometry, batch_size)

    _step(model, objective, teacher, optimizer, batch)  # warm-up: allocations, lazy inits
    with FlopCounterMode(display=False) as counter:
        _step(model, objective, teacher, optimizer, batch)
    step_flops = counter.get_total_flops()
    started = time.process_time()
    for _ in range(steps):
        _step(model, objective, teacher, optimizer, batch)
    cpu_per_step = (time.process_time() - started) / steps

    # The objective at the real global batch, on random unit embeddings (ranking cost grows with the batch).
    embed = model.spec.embed_dim
    outputs = {
        "image_features": torch.nn.functional.normalize(torch.randn(global_batch, embed), dim=-1).requires_grad_(),
        "text_features": torch.nn.functional.normalize(torch.randn(global_batch, embed), dim=-1).requires_grad_(),
        "logit_scale": torch.tensor(100.0),
    }
    with FlopCounterMode(display=False) as counter:
        objective(outputs, None, progress=0.5)["loss"].backward()
    objective_flops = counter.get_total_flops()
    return {
        "config": config,
        "run_type": run_type,
        "overrides": RUN_TYPES[run_type],
        "batch_size": batch_size,
        "flops_per_sample": step_flops / batch_size,
        "cpu_seconds_per_step": cpu_per_step,
        "cpu_seconds_per_sample": cpu_per_step / batch_size,
        "cpu_flops_per_second": step_flops / cpu_per_step,
        "objective_flops_at_global_batch": objective_flops,
        "global_batch": global_batch,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="rn50-cc3m", help="config preset or YAML file (default rn50-cc3m)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per measured step (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run type (default 3)")
    parser.add_argument("--global-batch", type=int, default=1024, help="batch for the objective's FLOPs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = work)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--run-types", nargs="*", default=list(RUN_TYPES), choices=list(RUN_TYPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for run_type in args.run_types:
        result = measure(run_type, config=args.config, batch_size=args.batch, steps=args.steps,
                         global_batch=args.global_batch)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
