"""``dinorankclip train``: train a model from a config file and dotted overrides."""

from __future__ import annotations

import json

from ..config import list_presets, load_config
from .common import OVERRIDE_HELP

NAME = "train"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config file and overrides",
                       description="Train a model. The run folder (train.output_dir) receives config.yaml, "
                                   "metrics.jsonl, tensorboard/, model.safetensors and training_state.json.")
    p.add_argument("--config", required=True, metavar="FILE",
                   help=f"YAML config file or preset name ({', '.join(list_presets())})")
    p.add_argument("--out", metavar="DIR", help="run folder; same as train.output_dir=DIR")
    p.add_argument("--resume", metavar="latest|DIR",
                   help="continue from the newest checkpoint of the run folder (latest; starts afresh when there is "
                        "none) or from a checkpoint folder; same as train.resume=...")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def run(args) -> int:
    from ..train.trainer import train

    overrides = list(args.overrides) + ([f"train.output_dir={args.out}"] if args.out else [])
    overrides += [f"train.resume={args.resume}"] if args.resume else []
    cfg = load_config(args.config, overrides)
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "seconds", "preempted") if k in summary}, indent=2))
    return 0
