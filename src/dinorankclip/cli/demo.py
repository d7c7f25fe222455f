"""``dinorankclip demo``: train on the bundled Flickr8k subset on a CPU, then evaluate.

The bundled data (``dinorankclip/sample_data``) holds real images: Flickr8k with its official split and
small subsets of CIFAR-10, GTSRB, Flowers-102, DTD and CUB-200. Numbers from this demo show that the
pipeline learns; they are not comparable with published results (tiny model, minutes of training,
images downscaled to 128 px).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..config import EvalConfig, load_config
from ..eval.bundled import ZEROSHOT_SETS, sample_data_root

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def _format_table(results: dict[str, Any]) -> str:
    rows = [("task", "metric", "value", "chance")]
    retrieval = results["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10"):
            rows.append((f"retrieval {direction.replace('_to_', '->')}", k,
                         f"{retrieval[direction][k]:.3f}", f"{retrieval['chance'][direction][k]:.3f}"))
    for name, metrics in results["zeroshot"].items():
        rows.append((f"zero-shot {name}", "top-1", f"{metrics['top1']:.3f}", f"{metrics['chance_top1']:.3f}"))
        rows.append((f"zero-shot {name}", "top-5", f"{metrics['top5']:.3f}", f"{metrics['chance_top5']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run_demo(*, minutes: float, out: Path, config: str = "tiny-cpu", overrides: list[str] | None = None,
             teacher_weights: str | None = None) -> dict[str, Any]:
    """Train within ``minutes`` on the bundled Flickr8k train split, evaluate, print and save results.

    Returns:
        The content of ``<out>/demo_results.json``.
    """
    from ..eval.features import Encoder
    from ..eval.runner import evaluate
    from ..models.trunk import build_tokenizer
    from ..train.checkpoint import load_model, write_json
    from ..train.distributed import resolve_device
    from ..train.trainer import train

    data = sample_data_root()
    base = [
        f"data.train={data / 'flickr8k' / 'train.csv'}",
        f"train.output_dir={out / 'run'}",
        f"train.time_budget_minutes={minutes}",
        "train.overwrite=true",  # running the demo again replaces its earlier run
    ]
    if teacher_weights:
        base.append(f"teacher.weights={teacher_weights}")
    cfg = load_config(config, base + list(overrides or []))
    logger.info("Demo: training %s (order %d, fusion %s) for at most %.1f minutes", cfg.loss.name, cfg.loss.order,
                cfg.fusion.variant, minutes)
    started = time.perf_counter()
    summary = train(cfg)

    device = resolve_device(cfg.train.device)
    model, cfg = load_model(Path(summary["run_dir"]) / "model.safetensors", map_location=device)
    eval_cfg = EvalConfig(
        batch_size=cfg.eval.batch_size,
        zeroshot={name: str(data / path) for name, path in ZEROSHOT_SETS.items()},
        retrieval=str(data / "flickr8k" / "test.csv"),
    )
    encoder = Encoder(model, build_tokenizer(model.spec), device)
    records = evaluate(encoder, eval_cfg, model_name="demo", num_workers=cfg.data.num_workers)

    retrieval = next(r["metrics"] for r in records if r["task"] == "zeroshot_retrieval")
    results = {
        "retrieval": {
            "image_to_text": retrieval["image_to_text"],
            "text_to_image": retrieval["text_to_image"],
            "chance": retrieval["chance"],
            "num_images": retrieval["num_images"],
            "num_texts": retrieval["num_texts"],
        },
        "zeroshot": {
            r["dataset"]: {key: r["metrics"][key] for key in ("top1", "top5", "chance_top1", "chance_top5",
                                                             "mean_per_class_recall", "num_images")}
            for r in records if r["task"] == "zeroshot_classification"
        },
        "train": {"steps": summary["steps"], "seconds": summary["seconds"]},
        "seconds_total": time.perf_counter() - started,
        "config": cfg.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo_results.json", results)
    table = _format_table(results)
    print(table)
    mean_r5 = (results["retrieval"]["image_to_text"]["R@5"] + results["retrieval"]["text_to_image"]["R@5"]) / 2
    chance_r5 = (results["retrieval"]["chance"]["image_to_text"]["R@5"]
                 + results["retrieval"]["chance"]["text_to_image"]["R@5"]) / 2
    print(f"\nmean retrieval R@5 {mean_r5:.3f} = {mean_r5 / chance_r5:.1f}x chance ({chance_r5:.3f}); "
          f"{summary['steps']} steps in {summary['seconds']:.0f} s; results in {out / 'demo_results.json'}")
    logger.debug("Demo results: %s", json.dumps(results["retrieval"]))
    return results
