"""Markdown report and comparison plots of a study (``OUT/report.md``, ``OUT/plots/summary.png``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["run_metrics", "summary_rows", "write_report"]

logger = logging.getLogger(__name__)

_TITLES = {
    "order-sweep": "Ranking-order sweep (R = 0..4, full fusion)",
    "fusion-ablation": "Fusion ablation (six variants and no injection, order 3)",
    "baselines": "Baselines under matched compute",
}
_ALIP_NOTE = ("ALIP normally uses a synthetic caption generated for each image. At this scale another human "
              "caption of the same image (the `{column}` column of the training table) stands in for it.")
_SUMMARY_COLUMNS = ("zeroshot_mean", "probe_mean", "R@1", "R@5", "R@10", "gap_clip", "gap_fused")
_HEADERS = {"zeroshot_mean": "zero-shot top-1", "probe_mean": "probe top-1", "R@1": "retrieval R@1",
            "R@5": "retrieval R@5", "R@10": "retrieval R@10", "gap_clip": "gap z_clip–t_clip",
            "gap_fused": "gap z_img–z_txt"}
# Higher is better for accuracies and recalls; the gaps are descriptive and never marked.
_MARK_BEST = {"zeroshot_mean", "probe_mean", "R@1", "R@5", "R@10"}


def run_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Collect one run's numbers from its records."""
    out: dict[str, Any] = {"zeroshot": {}, "zeroshot_chance": {}, "probe": {}, "probe_chance": {}, "skipped": {},
                           "retrieval": None, "gap": None}
    for record in records:
        task, name, metrics = record["task"], record["dataset"], record["metrics"]
        if record.get("skipped"):
            out["skipped"][(task, name)] = record["skipped"]
        elif task == "zeroshot_classification":
            out["zeroshot"][name], out["zeroshot_chance"][name] = metrics["top1"], metrics["chance_top1"]
        elif task == "linear_probe":
            out["probe"][name], out["probe_chance"][name] = metrics["top1"], metrics["chance_top1"]
        elif task == "zeroshot_retrieval":
            out["retrieval"] = metrics
        elif task == "modality_gap":
            out["gap"] = metrics
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Build one dict per run with the summary columns (NaN where a task was not run)."""
    rows = []
    for run in summary["runs"]:
        m = run_metrics(run["records"])
        row = {"label": run["label"], "name": run["name"], "params": run["params"], "steps": run["steps"],
               "train_seconds": run["train_seconds"], "eval_seconds": run["eval_seconds"], "metrics": m,
               "zeroshot_mean": _mean(m["zeroshot"].values()), "probe_mean": _mean(m["probe"].values())}
        for k in ("R@1", "R@5", "R@10"):
            row[k] = (_mean([m["retrieval"]["image_to_text"][k], m["retrieval"]["text_to_image"][k]])
                      if m["retrieval"] else math.nan)
        row["gap_clip"] = m["gap"]["gaps"]["clip_image|clip_text"] if m["gap"] else math.nan
        row["gap_fused"] = m["gap"]["gaps"]["fused_image|fused_text"] if m["gap"] else math.nan
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _param_columns(study: str) -> list[str]:
    return {"order-sweep": ["order"], "fusion-ablation": [], "baselines": ["loss", "fusion", "order"]}[study]


def _summary_table(study: str, rows: list[dict[str, Any]]) -> list[str]:
    params = _param_columns(study)
    best = {c: max((r[c] for r in rows if not math.isnan(r[c])), default=math.nan) for c in _MARK_BEST}
    body = []
    for r in rows:
        cells = [r["label"]] + [str(r["params"].get(p, "")) for p in params]
        cells += [str(r["steps"]), _fmt((r["train_seconds"] or 0) / 60, 1)]
        for c in _SUMMARY_COLUMNS:
            text = _fmt(r[c])
            if c in _MARK_BEST and not math.isnan(r[c]) and r[c] == best[c] and len(rows) > 1:
                text = f"**{text}**"
            cells.append(text)
        body.append(cells)
    header = ["run"] + params + ["steps", "train min"] + [_HEADERS[c] for c in _SUMMARY_COLUMNS]
    return _table(header, body)


def _per_dataset_table(rows: list[dict[str, Any]], key: str) -> list[str]:
    names = sorted({n for r in rows for n in r["metrics"][key]})
    if not names:
        return []
    body = [[r["label"]] + [_fmt(r["metrics"][key].get(n)) for n in names] + [_fmt(r[f"{key}_mean"])] for r in rows]
    chance = rows[0]["metrics"][f"{key}_chance"]
    body.append(["chance"] + [_fmt(chance.get(n)) for n in names] + [_fmt(_mean(chance.values()))])
    return _table(["run"] + names + ["mean"], body)


def _retrieval_table(rows: list[dict[str, Any]]) -> list[str]:
    with_retrieval = [r for r in rows if r["metrics"]["retrieval"]]
    if not with_retrieval:
        return []
    ks = ("R@1", "R@5", "R@10")
    body = []
    for r in with_retrieval:
        m = r["metrics"]["retrieval"]
        row = [_fmt(m["image_to_text"][k]) for k in ks] + [_fmt(m["text_to_image"][k]) for k in ks]
        body.append([r["label"]] + row)
    chance = with_retrieval[0]["metrics"]["retrieval"]["chance"]
    body.append(["chance"] + [_fmt(chance["image_to_text"][k]) for k in ks]
                + [_fmt(chance["text_to_image"][k]) for k in ks])
    m = with_retrieval[0]["metrics"]["retrieval"]
    caption = (f"{m['num_images']} images, {m['num_texts']} captions from `{Path(m['source']).name}`"
               f"{' (split ' + m['split'] + ')' if m.get('split') else ''}; an image counts as found when any of "
               "its captions is in the top K.")
    header = ["run"] + [f"image→text {k}" for k in ks] + [f"text→image {k}" for k in ks]
    return [caption, ""] + _table(header, body)


def _relative(path: str | Path, out: Path) -> str:
    try:
        return Path(path).resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def _gap_table(rows: list[dict[str, Any]], out: Path) -> list[str]:
    with_gap = [r for r in rows if r["metrics"]["gap"]]
    if not with_gap:
        return []
    pairs = list(with_gap[0]["metrics"]["gap"]["gaps"])
    body = []
    for r in with_gap:
        gap = r["metrics"]["gap"]
        plot = gap.get("plot")
        link = f"[PCA]({_relative(plot, out)})" if plot else ""
        body.append([r["label"]] + [_fmt(gap["gaps"][p]) for p in pairs] + [_fmt(gap["teacher_space_gap"]), link])
    header = ["run"] + [p.replace("|", " – ") for p in pairs] + ["teacher space", "plot"]
    num_pairs = with_gap[0]["metrics"]["gap"]["num_pairs"]
    note = (f"Centroid gap norms ||c_a − c_b|| between the four embedding sets on {num_pairs} "
            "held-out pairs (one caption per image; every set L2-normalised; all four in the CLIP space). "
            "`teacher space` is the gap between the student image branch's global feature and the text branch's "
            "projection, both in the teacher space (– without a student).")
    return [note, ""] + _table(header, body)


def _plot_summary(study: str, rows: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in ("zeroshot_mean", "probe_mean", "R@5") if any(not math.isnan(r[c]) for r in rows)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = [r[metric] for r in rows]
        if study == "order-sweep":
            orders = [r["params"]["order"] for r in rows]
            ax.plot(orders, values, marker="o")
            ax.set_xlabel("ranking order R")
            ax.set_xticks(orders)
        else:
            ax.bar(range(len(rows)), values, color="tab:blue")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([r["label"] for r in rows], rotation=35, ha="right", fontsize=8)
        ax.set_title(_HEADERS[metric])
        ax.grid(alpha=0.3)
    fig.suptitle(_TITLES[study], fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _best_sentence(study: str, rows: list[dict[str, Any]]) -> str:
    if study != "order-sweep" or len(rows) < 2:
        return ""
    parts = []
    for metric in ("zeroshot_mean", "probe_mean", "R@5"):
        valid = [r for r in rows if not math.isnan(r[metric])]
        if valid:
            top = max(valid, key=lambda r: r[metric])
            parts.append(f"{_HEADERS[metric]}: R = {top['params']['order']}")
    return "Best order per metric (this run of the study, one seed): " + "; ".join(parts) + "."


def _evaluation_setup(summary: dict[str, Any]) -> str:
    """Describe the datasets that the runs were evaluated on, read from their records."""
    zeroshot: dict[str, int] = {}
    probe: dict[str, int] = {}
    retrieval: dict[str, str] = {}
    gap: dict[str, str] = {}
    for run in summary["runs"]:
        for record in run["records"]:
            if record.get("skipped"):
                continue
            task, name, metrics = record["task"], record["dataset"], record["metrics"]
            if task == "zeroshot_classification":
                zeroshot[name] = metrics["num_images"]
            elif task == "linear_probe":
                probe[name] = metrics["num_train"] + metrics["num_val"] + metrics["num_test"]
            elif task == "zeroshot_retrieval":
                split = f", split {metrics['split']}" if metrics.get("split") else ""
                retrieval[name] = (f"`{Path(metrics['source']).name}` ({metrics['num_images']} images, "
                                   f"{metrics['num_texts']} captions{split})")
            elif task == "modality_gap":
                gap[name] = f"`{Path(metrics['source']).name}` ({metrics['num_pairs']} pairs)"

    parts = []
    if zeroshot:
        parts.append("zero-shot on " + ", ".join(f"{n} ({k} images)" for n, k in zeroshot.items()))
    if retrieval:
        parts.append("retrieval on " + ", ".join(retrieval.values()))
    if probe:
        parts.append("linear probe on " + ", ".join(f"{n} ({k} images)" for n, k in probe.items()))
    if gap:
        parts.append("modality gap on " + ", ".join(gap.values()))
    if not parts:
        return "Evaluation: no dataset was evaluated."
    return "Evaluation: " + "; ".join(parts) + "."


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """Write ``out/report.md`` and ``out/plots/summary.png`` from ``results/study.json`` content."""
    out = Path(out)
    study = summary["study"]
    rows = summary_rows(summary)
    settings = summary.get("settings", {})
    plot = _plot_summary(study, rows, out / "plots" / "summary.png")

    lines = [f"# {_TITLES[study]}", ""]
    lines += ["## Setup", ""]
    lines.append(f"- Preset `{summary['preset']}` (config `{settings.get('config')}`): "
                 f"trunk `{settings.get('trunk')}`, "
                 f"{settings.get('steps')} steps of batch {settings.get('batch_size')} per run, seed "
                 f"{settings.get('seed')}, the same data and steps for every run (matched compute).")
    lines.append(f"- Training data: `{settings.get('data')}`.")
    lines.append(f"- {_evaluation_setup(summary)}")
    lines.append(f"- Teacher `{settings.get('teacher')}`, weights: `{settings.get('teacher_weights')}` "
                 "(used only by runs with fusion).")
    for note in settings.get("notes", []):
        lines.append(f"- {note}")
    alip = next((r for r in summary["runs"] if r["params"].get("loss") == "alip"), None)
    if alip is not None:
        column = next(o.split("=", 1)[1] for o in alip["overrides"] if o.startswith("data.second_caption_column="))
        lines.append(f"- {_ALIP_NOTE.format(column=column)}")
    lines.append(f"- Wall time of the last invocation: {summary.get('wall_seconds_this_invocation', 0) / 60:.1f} min "
                 "(finished runs that were skipped take no training time).")
    lines.append("")

    lines += ["## Summary", ""]
    lines.append("Zero-shot and probe columns are means over the evaluated datasets; retrieval is the mean of "
                 "image→text and text→image recall. Bold marks the best run per column.")
    lines.append("")
    lines += _summary_table(study, rows)
    best = _best_sentence(study, rows)
    if best:
        lines += [best, ""]
    if plot is not None:
        lines += [f"![summary]({plot.relative_to(out).as_posix()})", ""]

    sections = [("Zero-shot classification (top-1)", _per_dataset_table(rows, "zeroshot")),
                ("Fine-grained linear probe (top-1)", _per_dataset_table(rows, "probe")),
                ("Retrieval", _retrieval_table(rows)),
                ("Four-node modality gap", _gap_table(rows, out))]
    for title, body in sections:
        if body:
            lines += [f"## {title}", ""] + body
    skipped = {key: reason for r in rows for key, reason in r["metrics"]["skipped"].items()}
    if skipped:
        lines += ["## Skipped datasets", ""]
        lines += [f"- {task} `{name}`: {reason}" for (task, name), reason in sorted(skipped.items())]
        lines.append("")
    lines += ["## Timing", ""]
    lines += _table(["run", "steps", "training s", "evaluation s"],
                    [[r["label"], str(r["steps"]), _fmt(r["train_seconds"], 0), _fmt(r["eval_seconds"], 0)]
                     for r in rows])
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
