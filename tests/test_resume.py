"""Exact resume: checkpoints restore every state, survive SIGKILL while saving, and SIGTERM writes one.

Runs use a relative ``train.output_dir`` inside different working folders, so two runs of the same
config store the same metadata and their ``model.safetensors`` files can be compared byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import REPO, one_thread  # noqa: F401

from dinorankclip.config import load_config
from dinorankclip.data.pack import pack_shards
from dinorankclip.train.checkpoint import load_model, save_model
from dinorankclip.train.resume import find_latest, resolve_resume
from dinorankclip.train.trainer import train

VARIANTS = {
    # name: (source, num_workers, extra overrides)
    "csv-w0": ("csv", 0, ["fusion.variant=none"]),
    "csv-w2": ("csv", 2, ["train.grad_accum_steps=2"]),
    "shards-w0": ("shards", 0, ["fusion.variant=none"]),
    "shards-w2": ("shards", 2, []),
}


@pytest.fixture(scope="module")
def data_sources(tmp_path_factory, sample_data) -> dict[str, str]:
    root = tmp_path_factory.mktemp("resume-data")
    rows = (sample_data / "flickr8k" / "train.csv").read_text().splitlines()[:161]
    table = root / "pairs.csv"
    table.write_text("\n".join(rows) + "\n")
    (root / "images").symlink_to(sample_data / "flickr8k" / "images")
    packed = pack_shards(table, root / "shards", shard_size=40)
    return {"csv": str(table), "shards": packed.pattern}


def _overrides(tiny_overrides, data_sources, variant: str, *extra: str) -> list[str]:
    source, workers, more = VARIANTS[variant]
    return list(tiny_overrides) + more + [
        f"data.train={data_sources[source]}", f"data.num_workers={workers}", "data.shuffle_buffer=16",
        "train.steps=10", "train.checkpoint_every=5", "train.output_dir=run", *extra,
    ]


def _train_in(folder: Path, overrides: list[str]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return train(load_config(None, overrides))
    finally:
        os.chdir(cwd)


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted 10-step runs (checkpoints at step 5), trained once per variant on first use."""
    root = tmp_path_factory.mktemp("reference")
    runs: dict[str, Path] = {}

    def get(variant: str, overrides: list[str]) -> Path:
        if variant not in runs:
            _train_in(root / variant, overrides)
            runs[variant] = root / variant / "run"
        return runs[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_is_bitwise_identical(tmp_path, tiny_overrides, data_sources, reference_runs, variant):
    overrides = _overrides(tiny_overrides, data_sources, variant)
    reference = reference_runs(variant, overrides)
    # A run killed after step 5 leaves exactly this checkpoint; resume it in a fresh run folder.
    target = tmp_path / "resumed" / "run" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-00000005", target / "step-00000005")
    summary = _train_in(tmp_path / "resumed", overrides + ["train.resume=latest"])
    assert summary["steps"] == 10
    assert summary["resumed_from"].endswith("step-00000005")
    resumed = tmp_path / "resumed" / "run" / "model.safetensors"
    assert resumed.read_bytes() == (reference / "model.safetensors").read_bytes()


def test_resume_warns_on_new_schedule_length(tmp_path, tiny_overrides, data_sources, reference_runs, caplog):
    overrides = _overrides(tiny_overrides, data_sources, "csv-w0")
    reference = reference_runs("csv-w0", overrides)
    with caplog.at_level(logging.WARNING, logger="dinorankclip"):
        checkpoint = reference / "checkpoints" / "step-00000005"
        summary = _train_in(tmp_path, overrides + ["train.steps=6", f"train.resume={checkpoint}"])
    assert summary["steps"] == 6
    assert any("schedule has 10 steps" in r.getMessage() for r in caplog.records)


def _launch(folder: Path, overrides: list[str]) -> subprocess.Popen:
    """Start ``dinorankclip train`` in a new process with the config written to a YAML file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(load_config(None, overrides).to_yaml())
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dinorankclip", "train", "--config", "config.yaml"], cwd=folder,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_while_saving_leaves_latest_loadable(tmp_path, tiny_overrides, data_sources, reference_runs):
    overrides = _overrides(tiny_overrides, data_sources, "csv-w0")
    reference = reference_runs("csv-w0", overrides)
    every_step = overrides + ["train.checkpoint_every=1", "train.keep_checkpoints=2"]
    process = _launch(tmp_path, every_step)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    partial = []
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoints.is_dir() and find_latest(tmp_path / "run") is not None:
                partial = [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
                if partial and _tmp_step(partial[0]) >= 3:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.001)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert partial, "the run ended before a checkpoint was caught half-written"
    assert any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())  # the kill hit a save in progress
    latest = resolve_resume("latest", tmp_path / "run")
    assert latest is not None and latest.name != partial[0].name
    model, _ = load_model(latest)  # the newest complete checkpoint loads
    assert model is not None
    summary = _train_in(tmp_path, every_step + ["train.resume=latest"])
    assert summary["steps"] == 10
    _same_weights(tmp_path / "run" / "model.safetensors", reference / "model.safetensors")


def _tmp_step(path: Path) -> int:
    return int(path.name.split("-")[2])  # .tmp-step-NNNNNNNN-PID


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_stop_signal_writes_resumable_checkpoint(tmp_path, tiny_overrides, data_sources, reference_runs, signum):
    overrides = _overrides(tiny_overrides, data_sources, "csv-w0")
    reference = reference_runs("csv-w0", overrides)
    process = _launch(tmp_path, overrides + ["train.checkpoint_every=0"])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            process.send_signal(signum)
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    expected_code = 130 if signum == signal.SIGINT else 0
    assert process.returncode == expected_code, stderr[-2000:]
    assert json.loads(stdout)["preempted"] is True
    assert json.loads(stdout)["stop_signal"] == signal.Signals(signum).name
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model from a stopped run
    latest = find_latest(tmp_path / "run")
    assert latest is not None and 2 <= _checkpoint_step(latest) < 10
    summary = _train_in(tmp_path, overrides + ["train.checkpoint_every=0", "train.resume=latest"])
    assert summary["steps"] == 10
    _same_weights(tmp_path / "run" / "model.safetensors", reference / "model.safetensors")


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])  # step-NNNNNNNN


def test_damaged_latest_falls_back_to_earlier(tmp_path, tiny_overrides, data_sources, reference_runs, caplog):
    overrides = _overrides(tiny_overrides, data_sources, "csv-w0")
    reference = reference_runs("csv-w0", overrides)
    shutil.copytree(reference, tmp_path / "run")
    newest = find_latest(tmp_path / "run")
    assert newest is not None and _checkpoint_step(newest) == 10
    (newest / "trainer.pt").write_bytes((newest / "trainer.pt").read_bytes()[:1000])
    (tmp_path / "run" / "model.safetensors").unlink()

    with pytest.raises(RuntimeError, match=r"step-00000010.*could not be loaded.*--resume .*step-00000005"):
        _train_in(tmp_path, overrides + [f"train.resume={newest}"])
    with caplog.at_level(logging.WARNING, logger="dinorankclip.train.trainer"):
        summary = _train_in(tmp_path, overrides + ["train.resume=latest"])
    assert "resuming from the earlier" in caplog.text
    assert summary["steps"] == 10
    _same_weights(tmp_path / "run" / "model.safetensors", reference / "model.safetensors")


def test_resume_warns_on_changed_config(tmp_path, tiny_overrides, data_sources, reference_runs, caplog):
    overrides = _overrides(tiny_overrides, data_sources, "csv-w0")
    shutil.copytree(reference_runs("csv-w0", overrides), tmp_path / "run")
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step-00000005")
    with caplog.at_level(logging.WARNING, logger="dinorankclip.train.trainer"):
        _train_in(tmp_path, overrides + [f"train.resume={checkpoint}", "train.lr=0.002"])
    assert "changed config" in caplog.text
    assert "train.lr: 0.0005 -> 0.002" in caplog.text


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    assert resolve_resume("latest", tmp_path) is None
    (tmp_path / "checkpoints" / ".tmp-step-00000003-123").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002").mkdir()  # incomplete: no files
    assert resolve_resume("latest", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="train.resume"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_saved_keys_have_no_wrapper_prefixes(tmp_path, tiny_overrides):
    import torch.distributed as dist

    from dinorankclip.models.dinorankclip import build_model

    cfg = load_config(None, list(tiny_overrides) + ["fusion.variant=none"])
    model = build_model(cfg, None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.compile(torch.nn.parallel.DistributedDataParallel(model))
        assert any(k.startswith("_orig_mod.module.") for k in wrapped.state_dict())
        save_model(tmp_path / "model.safetensors", wrapped, cfg)
    finally:
        dist.destroy_process_group()
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not [k for k in keys if "module." in k or "_orig_mod" in k]
    # Files written by other tools with the prefixes still load.
    prefixed = {f"module._orig_mod.{k}": v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"), metadata=metadata)
    loaded, _ = load_model(tmp_path / "prefixed.safetensors")
    assert torch.equal(loaded.trunk.logit_scale, model.trunk.logit_scale)


def test_fp16_resume_restores_scaler(tmp_path, tiny_overrides, data_sources):
    overrides = _overrides(tiny_overrides, data_sources, "csv-w0", "train.precision=fp16", "train.steps=4",
                           "train.checkpoint_every=2")
    _train_in(tmp_path / "full", overrides)
    checkpoint = tmp_path / "full" / "run" / "checkpoints" / "step-00000002"
    scaler = torch.load(checkpoint / "trainer.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0
    assert scaler["_growth_tracker"] == 2  # two overflow-free fp16 steps counted towards growing the scale
    target = tmp_path / "resumed" / "run" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(checkpoint, target / checkpoint.name)
    _train_in(tmp_path / "resumed", overrides + ["train.resume=latest"])
    resumed = (tmp_path / "resumed" / "run" / "model.safetensors").read_bytes()
    assert resumed == (tmp_path / "full" / "run" / "model.safetensors").read_bytes()
