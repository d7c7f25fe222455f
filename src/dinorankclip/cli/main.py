"""Command-line entry point: ``dinorankclip {train,eval,demo,config}``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..config import ConfigError, list_presets, load_config

__all__ = ["main"]

logger = logging.getLogger("dinorankclip")

OVERRIDE_HELP = (
    "dotted config overrides KEY=VALUE, e.g. loss.order=3 train.steps=200 data.train=pairs.csv "
    "(values are parsed as YAML: null, true, [1, 2])"
)


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("PIL").setLevel(logging.WARNING)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config file and overrides",
                       description="Train a model. The run folder (train.output_dir) receives config.yaml, "
                                   "metrics.jsonl, tensorboard/, model.safetensors and training_state.json.")
    p.add_argument("--config", required=True, metavar="FILE",
                   help=f"YAML config file or preset name ({', '.join(list_presets())})")
    p.add_argument("--out", metavar="DIR", help="run folder; same as train.output_dir=DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (zero-shot classification, retrieval)",
                       description="Evaluate a trained checkpoint. Results are CLIP_benchmark-style JSON records.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder or model.safetensors file")
    p.add_argument("--zeroshot", action="append", default=[], metavar="NAME=CSV",
                   help="zero-shot dataset: a name (for CLIP's templates) and a filepath,label CSV with "
                        "classnames.txt beside it; repeat for several datasets")
    p.add_argument("--retrieval", metavar="CSV", help="filepath,caption CSV for image-text retrieval")
    p.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with {c} for the class")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per batch (default 256)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader processes (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", metavar="FILE", help="write the results JSON here (default: print only)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train on the bundled Flickr8k subset, then evaluate (CPU, minutes)",
                       description="Train the default DinoRankCLIP (order 3, full fusion) on the bundled Flickr8k "
                                   "train split within a time budget, then evaluate retrieval on the Flickr8k test "
                                   "split and zero-shot classification on the bundled CIFAR-10, GTSRB, "
                                   "Flowers-102, DTD and CUB-200 subsets.")
    p.add_argument("--minutes", type=float, default=8.0, metavar="M",
                   help="training time budget in minutes (default 8; evaluation adds about one minute)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--config", default="tiny-cpu", metavar="FILE", help="config file or preset (default tiny-cpu)")
    p.add_argument("--teacher-weights", metavar="PATH",
                   help="local DINOv3 weights for the teacher; without it the preset's teacher is random")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config as YAML (checks keys and values)")
    p.add_argument("--config", metavar="FILE", help="YAML config file or preset name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinorankclip",
        description="DinoRankCLIP: CLIP pretraining with a frozen DINOv3 teacher and high-order Plackett-Luce "
                    "ranking.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_config(sub)
    return parser


def _cmd_train(args) -> int:
    from ..train.trainer import train

    overrides = list(args.overrides) + ([f"train.output_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "seconds") if k in summary}, indent=2))
    return 0


def _parse_pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r} is malformed; write NAME=CSV, e.g. cifar10=data/cifar10/test.csv")
        name, path = item.split("=", 1)
        pairs[name] = path
    return pairs


def _cmd_eval(args) -> int:
    from ..config import EvalConfig
    from ..eval.features import Encoder
    from ..eval.runner import evaluate
    from ..models.trunk import build_tokenizer
    from ..train.checkpoint import load_model
    from ..train.distributed import resolve_device

    zeroshot = _parse_pairs(args.zeroshot, "--zeroshot")
    if not zeroshot and not args.retrieval:
        raise ConfigError("nothing to evaluate; give --zeroshot NAME=CSV and/or --retrieval CSV")
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, map_location=device)
    eval_cfg = EvalConfig(batch_size=args.batch_size, zeroshot=zeroshot, retrieval=args.retrieval,
                          templates=args.templates)
    teacher = None
    if cfg.fusion.enabled and cfg.fusion.injection_source == "teacher":
        from ..train.teacher_source import OnlineTeacher

        teacher = OnlineTeacher(cfg, device)
    encoder = Encoder(model, build_tokenizer(model.spec), device, teacher)
    records = evaluate(encoder, eval_cfg, model_name=str(args.checkpoint), num_workers=args.workers)
    text = json.dumps(records, indent=2)
    if args.out:
        from ..train.checkpoint import write_json

        write_json(args.out, records)
        logger.info("Results written to %s", args.out)
    print(text)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(minutes=args.minutes, out=Path(args.out), config=args.config, overrides=list(args.overrides),
             teacher_weights=args.teacher_weights)
    return 0


def _cmd_config(args) -> int:
    print(load_config(args.config, list(args.overrides)).to_yaml(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo, "config": _cmd_config}
    try:
        return commands[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        if args.traceback:
            raise
        print(f"dinorankclip {args.command}: error: {err}\n(add --traceback before the command for details)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
