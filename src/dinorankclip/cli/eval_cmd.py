"""``dinorankclip eval``: run any subset of the evaluation tasks on a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ConfigError

NAME = "eval"

logger = logging.getLogger(__name__)

TASK_CHOICES = ("zeroshot", "retrieval", "probe", "modality_gap")


def add_dataset_arguments(p) -> None:
    """Options that name evaluation datasets; shared by ``eval`` and ``study``."""
    p.add_argument("--zeroshot", action="append", default=[], metavar="NAME=SOURCE",
                   help="zero-shot dataset: a name (cifar10, imagenet, cub200, ...) and a labels CSV "
                        "(filepath,label with classnames.txt beside it) or the dataset's root folder in its "
                        "standard layout; repeat for several datasets")
    p.add_argument("--retrieval", metavar="FILE", help="caption CSV (filepath,caption) or Karpathy-split JSON")
    p.add_argument("--retrieval-split", default="test", metavar="SPLIT",
                   help="split of a Karpathy JSON for retrieval and the modality gap (default test)")
    p.add_argument("--retrieval-images", metavar="DIR", help="image folder of a Karpathy JSON (default: its folder)")
    p.add_argument("--probe", action="append", default=[], metavar="NAME=SOURCE",
                   help="linear-probe dataset: a name and a labels CSV, a dataset root, or TRAIN_CSV,TEST_CSV; "
                        "repeat for several datasets")
    p.add_argument("--modality-gap", metavar="FILE",
                   help="held-out caption CSV or Karpathy JSON for the four-node modality gap")
    p.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with {c} for the class")
    p.add_argument("--bundled-eval", action="store_true",
                   help="evaluate on the bundled sample data: zero-shot on CIFAR-10, GTSRB, Flowers-102, DTD and "
                        "CUB-200, retrieval and modality gap on the Flickr8k test split, probe on the five "
                        "fine-grained sets (those without bundled images are reported as skipped)")


def parse_pairs(items: list[str], option: str) -> dict[str, str]:
    """Parse repeated ``NAME=PATH`` options into a dict.

    Raises:
        ConfigError: a malformed item, or two items that name the same dataset or would write the same
            record file (``cifar10`` and ``cifar-10``).
    """
    from ..eval.datasets import canonical_name
    from ..eval.runner import record_filename

    pairs: dict[str, str] = {}
    first_item: dict[str, str] = {}  # record file stem -> the item that claimed it
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r} is malformed; write NAME=SOURCE, e.g. cifar10=data/cifar10/test.csv")
        name, path = item.split("=", 1)
        if not name.strip() or not path.strip():
            raise ConfigError(f"{option} {item!r} lacks a {'dataset name' if not name.strip() else 'source'}; "
                              "write NAME=SOURCE, e.g. cifar10=data/cifar10/test.csv")
        key = record_filename({"task": "", "dataset": canonical_name(name.strip())})
        if key in first_item:
            raise ConfigError(f"{option} {first_item[key]!r} and {option} {item!r} name the same dataset "
                              f"{canonical_name(name.strip())!r}, so one result would replace the other; give "
                              "each dataset once")
        first_item[key] = item
        pairs[name.strip()] = path.strip()
    return pairs


def eval_config_from_args(args, batch_size: int, max_bad_fraction: float = 0.05):
    """Build the evaluation config from the dataset options.

    ``batch_size`` and ``max_bad_fraction`` set the fields of the same name (see ``EvalConfig``).

    Returns:
        (EvalConfig, skipped datasets with reasons). With ``--bundled-eval`` the bundled datasets fill every
        task that no option names.
    """
    from ..config import EvalConfig
    from ..eval.bundled import bundled_eval

    given = {
        "zeroshot": parse_pairs(args.zeroshot, "--zeroshot"),
        "retrieval": args.retrieval,
        "probe": parse_pairs(args.probe, "--probe"),
        "modality_gap": args.modality_gap,
    }
    skipped: dict[tuple[str, str], str] = {}
    if args.bundled_eval:
        bundled, bundled_skipped = bundled_eval(batch_size=batch_size)
        for task in given:
            if not given[task]:
                given[task] = getattr(bundled, task)
                skipped.update({k: v for k, v in bundled_skipped.items() if k[0] == task})
    cfg = EvalConfig(batch_size=batch_size, zeroshot=given["zeroshot"], retrieval=given["retrieval"],
                     retrieval_split=args.retrieval_split, retrieval_image_root=args.retrieval_images,
                     probe=given["probe"], modality_gap=given["modality_gap"], templates=args.templates,
                     max_bad_fraction=max_bad_fraction)
    return cfg, skipped


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint (zero-shot, retrieval, linear probe, modality gap)",
        description="Evaluate a trained checkpoint on any subset of the tasks. Results are CLIP_benchmark-style "
                    "JSON records (dataset, model, pretrained, task, metrics).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder or model.safetensors file")
    p.add_argument("--tasks", default=",".join(TASK_CHOICES), metavar="LIST",
                   help="comma-separated tasks to run among those given data "
                        f"(default: all of {', '.join(TASK_CHOICES)})")
    add_dataset_arguments(p)
    p.add_argument("--split", default="test", metavar="SPLIT",
                   help="split read from zero-shot dataset folders and CSVs with a split column (default test)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per batch (default 256)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, metavar="F",
                   help="a task fails when more than this fraction of its images cannot be read, in [0, 1] "
                        "(default 0.05)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader processes (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--teacher-weights", metavar="PATH",
                   help="teacher weights for a checkpoint trained with fusion.injection_source=teacher, in place of "
                        "the teacher.weights path saved with it (other checkpoints need no teacher)")
    p.add_argument("--out", metavar="PATH",
                   help="a .json file for all records, or a folder that receives one JSON per record, all.json "
                        "and the modality-gap plot (default: print only)")


def run(args) -> int:
    from ..eval.runner import build_encoder, evaluate, record_filename
    from ..train.checkpoint import write_json
    from ..train.distributed import resolve_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_CHOICES]
    if unknown:
        raise ConfigError(f"--tasks {unknown[0]!r} is invalid; allowed tasks: {', '.join(TASK_CHOICES)}")
    eval_cfg, skipped = eval_config_from_args(args, args.batch_size, max_bad_fraction=args.max_bad_fraction)
    eval_cfg.zeroshot_split = args.split
    has_data = {"zeroshot": bool(eval_cfg.zeroshot), "retrieval": bool(eval_cfg.retrieval),
                "probe": bool(eval_cfg.probe), "modality_gap": bool(eval_cfg.modality_gap)}
    if not any(has_data[t] for t in tasks):
        raise ConfigError("nothing to evaluate; give datasets with --zeroshot, --retrieval, --probe or "
                          "--modality-gap for the chosen --tasks, or --bundled-eval")
    out = Path(args.out) if args.out else None
    folder = None
    if out is not None:
        folder = out.parent if out.suffix.lower() == ".json" else out

    device = resolve_device(args.device, option="--device")
    encoder, _ = build_encoder(args.checkpoint, device, teacher_weights=args.teacher_weights)
    checkpoint = Path(args.checkpoint)
    model_name = checkpoint.parent.name if checkpoint.is_file() else checkpoint.name
    records = evaluate(encoder, eval_cfg, model_name=model_name, num_workers=args.workers,
                       tasks=tasks, skipped=skipped, plot_dir=folder, pretrained=str(args.checkpoint))
    if out is not None and out.suffix.lower() == ".json":
        write_json(out, records)
        logger.info("Results written to %s", out)
    elif out is not None:
        for record in records:
            write_json(out / record_filename(record), record)
        write_json(out / "all.json", records)
        logger.info("Results written to %s (%d records)", out, len(records))
    print(json.dumps(records, indent=2))
    return 0
