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
    keys = ("run_dir", "steps", "seconds", "preempted", "stop_signal")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    # Ctrl-C stops with a checkpoint but exits like an interrupted command (128 + SIGINT), so a script can tell
    # it from a finished run; SIGTERM and SIGUSR1 (preemption) exit with 0.
    return 130 if summary.get("stop_signal") == "SIGINT" else 0
