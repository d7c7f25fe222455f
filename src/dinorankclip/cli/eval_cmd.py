"""``dinorankclip eval``: evaluate a checkpoint on zero-shot classification and retrieval."""

from __future__ import annotations

import json
import logging

from ..config import ConfigError

NAME = "eval"

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
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


def parse_pairs(items: list[str], option: str) -> dict[str, str]:
    """Parse repeated ``NAME=PATH`` options into a dict."""
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r} is malformed; write NAME=CSV, e.g. cifar10=data/cifar10/test.csv")
        name, path = item.split("=", 1)
        pairs[name] = path
    return pairs


def run(args) -> int:
    from ..config import EvalConfig
    from ..eval.features import Encoder
    from ..eval.runner import evaluate
    from ..models.trunk import build_tokenizer
    from ..train.checkpoint import load_model, write_json
    from ..train.distributed import resolve_device

    zeroshot = parse_pairs(args.zeroshot, "--zeroshot")
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
    if args.out:
        write_json(args.out, records)
        logger.info("Results written to %s", args.out)
    print(json.dumps(records, indent=2))
    return 0
