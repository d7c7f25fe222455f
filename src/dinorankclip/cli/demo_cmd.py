"""``dinorankclip demo``: train on the bundled Flickr8k subset, then evaluate."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .common import OVERRIDE_HELP

NAME = "demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train on the bundled Flickr8k subset, then evaluate (CPU, minutes)",
                       description="Train the default DinoRankCLIP (order 3, full fusion) on the bundled Flickr8k "
                                   "train split within a time budget, then evaluate retrieval on the Flickr8k test "
                                   "split and zero-shot classification on the bundled CIFAR-10, GTSRB, "
                                   "Flowers-102, DTD and CUB-200 subsets.")
    p.add_argument("--minutes", type=float, default=8.0, metavar="M",
                   help="training time budget in minutes (default 8; evaluation adds about one minute)")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="output folder (default runs/demo); a demo run already in it is replaced")
    p.add_argument("--config", default="tiny-cpu", metavar="FILE", help="config file or preset (default tiny-cpu)")
    p.add_argument("--teacher-weights", metavar="PATH",
                   help="local DINOv3 weights for the teacher; without it the preset's teacher is random")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def run(args) -> int:
    from .demo import run_demo

    if not args.minutes > 0:
        raise ConfigError(f"--minutes {args.minutes} is invalid; give a training time budget above 0, e.g. --minutes 8")
    run_demo(minutes=args.minutes, out=Path(args.out), config=args.config, overrides=list(args.overrides),
             teacher_weights=args.teacher_weights)
    return 0
