"""``dinorankclip study``: train, evaluate and report the order sweep, the fusion ablation or the baselines."""

from __future__ import annotations

import sys

from ..config import list_presets, load_config
from .common import OVERRIDE_HELP

NAME = "study"


_HELP = {
    "order-sweep": "ranking order R = 0..4 with full fusion",
    "fusion-ablation": "the six fusion variants and no injection, at order 3",
    "baselines": "CLIP, CyCLIP, ALIP, RankCLIP and DinoRankCLIP under matched compute",
}


def add_parser(sub) -> None:
    from ..studies.specs import STUDIES

    p = sub.add_parser(
        "study", help="run a study: order sweep, fusion ablation or baselines (train, evaluate, report)",
        description="Train every run of a study with the same data, trunk and steps, evaluate zero-shot "
                    "classification, retrieval, the fine-grained probe and the modality gap, and write "
                    "OUT/results/*.json and OUT/report.md. Finished runs are skipped, so an interrupted study "
                    "continues where it stopped.")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name in STUDIES:
        _add_study_parser(studies.add_parser(name, help=_HELP[name], description=f"Study: {_HELP[name]}."))


def _add_study_parser(p) -> None:
    from ..studies.specs import PRESETS
    from .eval_cmd import add_dataset_arguments

    p.add_argument("--out", required=True, metavar="DIR", help="study folder (runs/, results/, plots/, report.md)")
    p.add_argument("--preset", default="tiny-cpu", metavar="NAME",
                   help=f"study preset ({', '.join(PRESETS)}: bundled data, sized for a 2-core CPU) or any config "
                        f"preset or YAML file ({', '.join(list_presets())}); default tiny-cpu")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps per run (default: the preset's)")
    p.add_argument("--teacher-weights", metavar="PATH", help="local DINOv3 weights for the runs with fusion")
    p.add_argument("--second-caption-column", metavar="COLUMN",
                   help="column of data.train with a second caption per image, for ALIP in the baselines study "
                        "(default: the preset's; caption2 for tiny-cpu)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="evaluation data loader processes (default 0)")
    p.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again")
    p.add_argument("--plan", action="store_true",
                   help="print the train command of every run and exit, e.g. to launch each with torchrun; "
                        "the study then only evaluates the finished runs")
    add_dataset_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP + "; applied to every run")


def run(args) -> int:
    from ..studies.runner import StudyInterrupted, plan_study, run_study
    from ..studies.specs import get_preset
    from .eval_cmd import eval_config_from_args

    if args.plan:
        for command in plan_study(args.study, out=args.out, preset=args.preset, steps=args.steps,
                                  overrides=list(args.overrides), teacher_weights=args.teacher_weights,
                                  second_caption_column=args.second_caption_column):
            print(command)
        return 0

    eval_cfg, skipped = None, None
    if args.zeroshot or args.retrieval or args.probe or args.modality_gap or args.bundled_eval:
        run_eval = load_config(get_preset(args.preset).config, list(args.overrides)).eval
        eval_cfg, skipped = eval_config_from_args(args, batch_size=run_eval.batch_size,
                                                  max_bad_fraction=run_eval.max_bad_fraction)
    try:
        summary = run_study(args.study, out=args.out, preset=args.preset, steps=args.steps,
                            overrides=list(args.overrides), teacher_weights=args.teacher_weights,
                            second_caption_column=args.second_caption_column, eval_cfg=eval_cfg, skipped=skipped,
                            device=args.device, num_workers=args.workers, reevaluate=args.reevaluate)
    except StudyInterrupted as stopped:
        print(f"dinorankclip study: interrupted: {stopped}", file=sys.stderr)
        return 130 if stopped.signal_name == "SIGINT" else 0  # as dinorankclip train
    print(f"{args.study}: {len(summary['runs'])} runs in {summary['wall_seconds_this_invocation'] / 60:.1f} min; "
          f"report: {args.out}/report.md")
    return 0
