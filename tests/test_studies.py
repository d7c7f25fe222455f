"""Studies: run definitions, an end-to-end order sweep (resumable), the baselines command and its report."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from table_helpers import write_table

from dinorankclip.cli.main import main
from dinorankclip.config import ConfigError, EvalConfig
from dinorankclip.studies.runner import run_study
from dinorankclip.studies.specs import get_preset, study_runs
from dinorankclip.train.resume import find_latest


def test_order_sweep_runs():
    runs = study_runs("order-sweep")
    assert [r.params["order"] for r in runs] == [0, 1, 2, 3, 4]
    assert all("fusion.variant=full" in r.overrides and "loss.name=dinorankclip" in r.overrides for r in runs)


def test_fusion_ablation_runs():
    runs = study_runs("fusion-ablation")
    assert [r.params["fusion"] for r in runs] == ["full", "no_pyramid", "no_channel_spatial", "image_only",
                                                  "no_refiner", "no_gate", "none"]


def test_baselines_runs_need_second_caption():
    runs = study_runs("baselines", second_caption_column="caption2")
    assert [r.label for r in runs] == ["CLIP", "CyCLIP", "ALIP", "RankCLIP", "DinoRankCLIP"]
    alip = runs[2]
    assert "data.second_caption_column=caption2" in alip.overrides
    assert all("fusion.variant=none" in r.overrides for r in runs[:4])
    with pytest.raises(ConfigError, match="--second-caption-column"):
        study_runs("baselines")
    with pytest.raises(ConfigError, match="allowed studies"):
        study_runs("temperature-sweep")


def test_tiny_cpu_preset_matches_compute():
    preset = get_preset("tiny-cpu")
    assert set(preset.steps) == {"order-sweep", "fusion-ablation", "baselines"}
    assert preset.second_caption_column == "caption2"
    cfg, skipped = preset.eval_config(batch_size=64)
    assert set(cfg.zeroshot) == {"cifar10", "gtsrb", "flowers102", "dtd", "cub200"}
    assert set(cfg.probe) == {"cub200", "flowers102", "dtd"}
    assert set(skipped) == {("probe", "fgvc_aircraft"), ("probe", "stanford_cars")}


def _small_sets(tmp_path: Path, sample_data: Path) -> tuple[Path, Path]:
    """Return 10 Flickr8k test pairs and 20 DTD images (2 per class), with absolute image paths."""
    pairs = list(csv.DictReader((sample_data / "flickr8k" / "test.csv").open(newline="")))[:10]
    for row in pairs:
        row["filepath"] = str(sample_data / "flickr8k" / row["filepath"])
    labels = list(csv.DictReader((sample_data / "dtd" / "labels.csv").open(newline="")))
    labels = [row for i, row in enumerate(labels) if i % 10 < 2]
    for row in labels:
        row["filepath"] = str(sample_data / "dtd" / row["filepath"])
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "classnames.txt").write_text((sample_data / "dtd" / "classnames.txt").read_text())
    return (write_table(tmp_path / "pairs.csv", pairs, ["filepath", "caption"]),
            write_table(tmp_path / "dtd" / "labels.csv", labels, ["filepath", "label"]))


def _small_eval(tmp_path: Path, sample_data: Path) -> EvalConfig:
    pairs, dtd = _small_sets(tmp_path, sample_data)
    return EvalConfig(batch_size=64, zeroshot={"dtd": str(dtd)}, retrieval=str(pairs), probe={"dtd": str(dtd)},
                      modality_gap=str(pairs), probe_c_values=[1.0, 10.0])


def test_order_sweep_end_to_end_and_resume(tmp_path, sample_data, tiny_overrides):
    out = tmp_path / "sweep"
    eval_cfg = _small_eval(tmp_path, sample_data)
    skipped = {("probe", "stanford_cars"): "not bundled"}
    summary = run_study("order-sweep", out=out, steps=1, overrides=list(tiny_overrides), eval_cfg=eval_cfg,
                        skipped=skipped, device="cpu")
    assert [r["name"] for r in summary["runs"]] == ["order0", "order1", "order2", "order3", "order4"]
    for r in summary["runs"]:
        assert (out / "runs" / r["name"] / "model.safetensors").is_file()
        assert json.loads((out / "results" / f"{r['name']}.json").read_text())["records"] == r["records"]
        assert {rec["task"] for rec in r["records"]} == {"zeroshot_classification", "zeroshot_retrieval",
                                                         "linear_probe", "modality_gap"}
        assert (out / "plots" / r["name"] / "modality_gap__pairs.png").is_file()
    report = (out / "report.md").read_text()
    for order in range(5):
        assert f"| R = {order} | {order} | 1 |" in report
    assert "![summary](plots/summary.png)" in report
    assert (out / "plots" / "summary.png").is_file()
    assert "linear_probe `stanford_cars`: not bundled" in report
    assert "ALIP" not in report
    # The setup lists the datasets given to this study, not the bundled ones of the preset.
    assert ("- Evaluation: zero-shot on dtd (20 images); retrieval on `pairs.csv` (2 images, 10 captions); "
            "linear probe on dtd (20 images); modality gap on `pairs.csv` (2 pairs).") in report
    assert "CIFAR-10" not in report

    # A second invocation trains and evaluates nothing and leaves the runs untouched.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    again = run_study("order-sweep", out=out, steps=1, overrides=list(tiny_overrides), eval_cfg=eval_cfg,
                      skipped=skipped, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")} == stamps
    assert [r["eval_seconds"] for r in again["runs"]] == [r["eval_seconds"] for r in summary["runs"]]

    # A finished run trained with other settings stops the study instead of mixing settings.
    with pytest.raises(ConfigError, match="train.steps: 1 -> 2"):
        run_study("order-sweep", out=out, steps=2, overrides=list(tiny_overrides), eval_cfg=eval_cfg, device="cpu")


def test_baselines_command(tmp_path, sample_data, tiny_overrides, capsys):
    pairs, dtd = _small_sets(tmp_path, sample_data)
    out = tmp_path / "baselines"
    code = main(["study", "baselines", "--out", str(out), "--steps", "1", "--device", "cpu",
                 "--zeroshot", f"dtd={dtd}", "--retrieval", str(pairs),
                 *tiny_overrides])
    assert code == 0
    assert "5 runs" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for label in ("CLIP", "CyCLIP", "ALIP", "RankCLIP", "DinoRankCLIP"):
        assert f"| {label} |" in report
    assert "another human caption of the same image (the `caption2` column" in report
    alip_config = (out / "runs" / "alip" / "config.yaml").read_text()
    assert "second_caption_column: caption2" in alip_config
    assert "train_pairs.csv" in alip_config


def test_ctrl_c_stops_study_resumably(tmp_path, sample_data, tiny_overrides, capsys):
    pairs, dtd = _small_sets(tmp_path, sample_data)
    out = tmp_path / "sweep"
    metrics = out / "runs" / "order0" / "metrics.jsonl"

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns the first Ctrl-C into a stop

    sender = threading.Thread(target=interrupt)
    sender.start()
    args = ["study", "order-sweep", "--out", str(out), "--steps", "400", "--device", "cpu",
            "--retrieval", str(pairs), *tiny_overrides, "train.log_every=1", "train.checkpoint_every=0"]
    code = main(args)
    sender.join()
    assert code == 130
    error = capsys.readouterr().err
    assert "interrupted: run order0 stopped at step" in error
    assert "rerun the same study command" in error
    assert find_latest(out / "runs" / "order0") is not None  # the stop wrote a checkpoint
    assert not (out / "runs" / "order0" / "model.safetensors").exists()
    assert not (out / "runs" / "order1").exists()


def test_plan_commands_match_study_configs(tmp_path, tiny_overrides):
    import shlex

    from dinorankclip.cli.main import build_parser
    from dinorankclip.config import load_config
    from dinorankclip.studies.runner import _flatten, _study_configs, plan_study

    out = tmp_path / "planned"
    commands = plan_study("order-sweep", out=out, steps=7, overrides=list(tiny_overrides))
    _, runs, configs = _study_configs("order-sweep", out=out, preset="tiny-cpu", steps=7,
                                      overrides=list(tiny_overrides), teacher_weights=None,
                                      second_caption_column=None, device="cpu")
    assert len(commands) == len(runs) == 5
    for command, run in zip(commands, runs, strict=True):
        args = build_parser().parse_args(shlex.split(command)[1:])
        trained = load_config(args.config, list(args.overrides) + [f"train.output_dir={args.out}"])
        assert _flatten(trained.to_dict()) == _flatten(configs[run.name].to_dict())
        assert trained.train.steps == 7


def test_interrupted_run_resumes_from_checkpoint(tmp_path, tiny_overrides):
    from dinorankclip.studies.runner import _study_configs, _train_run
    from dinorankclip.train.trainer import train

    overrides = list(tiny_overrides) + ["train.checkpoint_every=1"]
    _, runs, configs = _study_configs("order-sweep", out=tmp_path, preset="tiny-cpu", steps=2, overrides=overrides,
                                      teacher_weights=None, second_caption_column=None, device="cpu")
    cfg = configs[runs[0].name]
    train(cfg)
    run_dir = Path(cfg.train.output_dir)
    # A run stopped after its last checkpoint but before the final files were written.
    (run_dir / "model.safetensors").unlink()
    (run_dir / "training_state.json").unlink()
    summary = _train_run(runs[0], cfg)
    assert summary["resumed_from"] is not None
    assert Path(summary["resumed_from"]).parent == run_dir / "checkpoints"
    assert (run_dir / "model.safetensors").is_file()
