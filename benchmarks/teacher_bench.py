"""Train-step time of the teacher paths, as ratios to plain RankCLIP, measured in one process.

Cases (all with the same trunk, image size, batch and real Flickr8k batch held in memory):

- ``rankclip``: no injection (``loss.name=rankclip fusion.variant=none``), the baseline;
- ``cached``: DinoRankCLIP at ranking order 1 (as RankCLIP) with the student and full fusion, teacher features
  read from a real cache on disk (built here from the batch's images with the configured teacher);
- ``online``: the same model with the DINOv3 teacher run on every step;
- ``cached-order3`` (optional): ``cached`` with DinoRankCLIP's default ranking order 3 instead of 1;
- ``cached-student6`` (optional): ``cached`` with a 6-block student instead of ViT-Tiny's 12 blocks.

A step is what the trainer does per batch: teacher features (cache lookup or teacher forward), model forward,
objective, backward, gradient clipping, AdamW step. Data loading is not timed. The cases take turns step by step
after their warm-up steps, so a load change on a shared machine affects every case alike. Each case reports
the minimum and median wall-clock time, the minimum CPU time of this process, and the FLOPs of one step as
counted by ``torch.utils.flop_counter``. Ratios use the minima: other processes only ever add time, so on a shared
machine the minimum is the closest to a step's own cost.

Example with the defaults (ViT-B/32 trunk at 224 px, batch 32, DINOv3 ViT-B/16 teacher with random weights)::

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/teacher_bench.py --steps 3 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dinorankclip.config import Config, load_config  # noqa: E402
from dinorankclip.data.csv_dataset import CaptionDataset, collate_samples  # noqa: E402
from dinorankclip.data.transforms import PairedViews  # noqa: E402
from dinorankclip.losses import Objective  # noqa: E402
from dinorankclip.models.dinorankclip import build_model  # noqa: E402
from dinorankclip.models.trunk import build_tokenizer  # noqa: E402
from dinorankclip.teacher import build_teacher  # noqa: E402
from dinorankclip.teacher.cache import weights_fingerprint  # noqa: E402
from dinorankclip.teacher.cache_build import CacheBuildSettings, build_teacher_cache, table_samples  # noqa: E402
from dinorankclip.train.optim import build_optimizer  # noqa: E402
from dinorankclip.train.teacher_source import build_teacher_source  # noqa: E402

DATA = REPO / "src" / "dinorankclip" / "sample_data" / "flickr8k" / "train.csv"
CASES = ("rankclip", "cached", "online", "cached-order3", "cached-student6")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trunk", default="ViT-B-32", help="open_clip trunk (default ViT-B-32)")
    p.add_argument("--image-size", type=int, default=224, help="trunk, teacher and student input size in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (default 32)")
    p.add_argument("--teacher", default="vit_base_patch16_dinov3", help="timm DINOv3 teacher")
    p.add_argument("--teacher-weights", default="random", help="teacher weights file, or random (default)")
    p.add_argument("--pca-dim", type=int, default=256, help="cache PCA width (default 256)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per case, the first counting FLOPs (default 2, at least 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (default 3)")
    p.add_argument("--cases", default="rankclip,cached,online",
                   help=f"comma-separated cases among {', '.join(CASES)}; rankclip is always run")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides applied to every case")
    return p.parse_args(argv)


def case_config(case: str, args: argparse.Namespace, cache_dir: Path) -> Config:
    common = [
        f"model.trunk={args.trunk}",
        f"model.image_size={args.image_size}",
        f"teacher.name={args.teacher}",
        f"teacher.weights={args.teacher_weights}",
        f"teacher.image_size={args.image_size}",
        f"train.batch_size={args.batch_size}",
        f"train.device={args.device}",
        "train.warmup_steps=0",
    ]
    per_case = {
        "rankclip": ["loss.name=rankclip", "fusion.variant=none"],
        "cached": ["loss.name=dinorankclip", "loss.order=1", f"teacher.cache={cache_dir}"],
        "online": ["loss.name=dinorankclip", "loss.order=1"],
        "cached-order3": ["loss.name=dinorankclip", "loss.order=3", f"teacher.cache={cache_dir}"],
        "cached-student6": ["loss.name=dinorankclip", "loss.order=1", f"teacher.cache={cache_dir}",
                            "student.model_kwargs={depth: 6}"],
    }
    return load_config(None, common + per_case[case] + list(args.overrides))


def real_batch(spec, teacher_size: int, batch_size: int) -> dict:
    """Collate ``batch_size`` distinct Flickr8k images with one caption each, as the trainer's loader would."""
    views = PairedViews(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std,
                        teacher_size=teacher_size, train=False)
    dataset = CaptionDataset(DATA, transform=views, tokenizer=build_tokenizer(spec))
    rows, seen = [], set()
    for index, key in enumerate(dataset.keys):
        if key not in seen:
            seen.add(key)
            rows.append(index)
        if len(rows) == batch_size:
            break
    return collate_samples([dataset[index] for index in rows])


def build_cache(args: argparse.Namespace, cfg: Config, keys: list[str], out: Path) -> None:
    """Write a real cache of the batch's images with the configured teacher."""
    batch_keys = set(keys)
    samples = [(key, loader) for key, loader in table_samples(DATA) if key in batch_keys]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights, blocks=tuple(cfg.teacher.blocks),
                                **cfg.teacher.model_kwargs)
    build_teacher_cache(
        teacher, samples, out, pca_samples=samples, model_kwargs=cfg.teacher.model_kwargs,
        weights_fingerprint=weights_fingerprint(cfg.teacher.weights, random_seed=cfg.train.seed),
        requested_blocks=list(cfg.teacher.blocks), image_size=cfg.teacher.image_size, data_path=str(DATA),
        settings=CacheBuildSettings(pca_dim=args.pca_dim, shard_size=args.batch_size, batch_size=args.batch_size),
        device=args.device,
    )


class Case:
    """One configuration's model, objective, optimiser and teacher source, and its step."""

    def __init__(self, name: str, cfg: Config, device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)
        self.name = name
        self.cfg = cfg
        self.device = device
        self.teacher, geometry = build_teacher_source(cfg, device)
        self.model = build_model(cfg, geometry).to(device).train()
        self.objective = Objective(cfg.loss, self.model.spec.embed_dim).to(device).train()
        self.optimizer = build_optimizer([("model", self.model), ("objective", self.objective)], lr=cfg.train.lr,
                                         weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.betas),
                                         eps=cfg.train.eps)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.trainable = sum(p.numel() for p in self.params)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.flops = float("nan")

    def count_flops(self, batch: dict) -> None:
        """Run one step under torch's FLOP counter (matrix products and convolutions, forward and backward)."""
        counter = FlopCounterMode(display=False)
        with counter:
            self.step(batch)
        self.flops = counter.get_total_flops()

    def timed_step(self, batch: dict) -> None:
        """Run one step and record its wall-clock time and this process's CPU time, in seconds."""
        cpu_started = time.process_time()
        self.times.append(self.step(batch))
        self.cpu_times.append(time.process_time() - cpu_started)

    def step(self, batch: dict) -> float:
        """Run one training step on ``batch`` and return its wall-clock time in seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        image = batch["image"].to(self.device)
        text = batch["text"].to(self.device)
        view = batch["teacher_view"].to(self.device) if self.model.student_image is not None else None
        teacher_out = self.teacher(batch) if self.teacher is not None else None
        levels = teacher_out.patch_levels if self.model.injection_source == "teacher" and teacher_out else None
        outputs = self.model(image, text, view, levels)
        loss = self.objective(outputs, teacher_out, progress=0.5, batch=batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ["rankclip"] + [c for c in args.cases.split(",") if c and c != "rankclip"]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose among {', '.join(CASES)}")

    with tempfile.TemporaryDirectory(prefix="teacher_bench_") as tmp:
        cache_dir = Path(tmp) / "cache"
        configs = {name: case_config(name, args, cache_dir) for name in names}
        cases = [Case("rankclip", configs["rankclip"], device)]
        batch = real_batch(cases[0].model.spec, args.image_size, args.batch_size)
        if any(name.startswith("cached") for name in names):
            started = time.perf_counter()
            build_cache(args, configs["rankclip"], batch["key"], cache_dir)
            print(f"cache of {len(batch['key'])} images built in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        cases += [Case(name, configs[name], device) for name in names[1:]]
        for case in cases:
            case.count_flops(batch)  # also the first warm-up step
            for _ in range(args.warmup - 1):
                case.step(batch)
        for _ in range(args.steps):
            for case in cases:
                case.timed_step(batch)
                print(f"{case.name}: {case.times[-1]:.3f} s wall, {case.cpu_times[-1]:.3f} s CPU", file=sys.stderr)

    base, base_cpu, base_flops = min(cases[0].times), min(cases[0].cpu_times), cases[0].flops
    rows = []
    for case in cases:
        wall, cpu = min(case.times), min(case.cpu_times)
        rows.append({"case": case.name, "min_wall_s": wall, "median_wall_s": statistics.median(case.times),
                     "min_cpu_s": cpu, "gflop": case.flops / 1e9, "wall_ratio": wall / base,
                     "cpu_ratio": cpu / base_cpu, "flop_ratio": case.flops / base_flops,
                     "trainable_params_m": case.trainable / 1e6, "wall_s": case.times, "cpu_s": case.cpu_times})
    setting = (f"trunk {args.trunk} at {args.image_size} px, batch {args.batch_size}, teacher {args.teacher} "
               f"({args.teacher_weights}), device {args.device}, {torch.get_num_threads()} threads, "
               f"{args.warmup} warm-up + {args.steps} timed steps per case, torch {torch.__version__}")
    print(f"\n{setting}\n")
    print("| case | wall s (min) | wall s (median) | CPU s (min) | GFLOP | wall ratio | CPU ratio | FLOP ratio "
          "| params (M) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['case']} | {row['min_wall_s']:.2f} | {row['median_wall_s']:.2f} | {row['min_cpu_s']:.2f} | "
              f"{row['gflop']:.0f} | {row['wall_ratio']:.2f} | {row['cpu_ratio']:.2f} | {row['flop_ratio']:.2f} | "
              f"{row['trainable_params_m']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
