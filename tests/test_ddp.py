"""Distributed training with real torchrun processes (2 gloo processes on the CPU) and launcher detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_gradient_worker import single_process_gradients
from test_train_step import assert_same_gradients
from train_helpers import REPO, TINY_OVERRIDES, one_thread, write_good_shard  # noqa: F401

from dinorankclip.config import load_config
from dinorankclip.train.distributed import detect_launcher, init_distributed
from dinorankclip.train.trainer import train

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
ALIP = "loss.name=alip|fusion.variant=none|data.second_caption_column=caption2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), *args]
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_gradient_equals_single_process(tmp_path):
    """Each process scores its 4 rows against all 8 columns; DDP's average equals one process on all 8."""
    cases = {"dinorankclip": (1, ""), "dinorankclip_accum": (2, ""), "alip": (1, ALIP)}
    out = tmp_path / "grads.pt"
    _torchrun(str(REPO / "tests" / "ddp_gradient_worker.py"), str(out),
              *[f"{name}:{accum}:{overrides}" for name, (accum, overrides) in cases.items()], cwd=tmp_path)
    distributed = torch.load(out)
    for name, (_, overrides) in cases.items():
        reference = single_process_gradients(1, tuple(o for o in overrides.split("|") if o))
        assert torch.allclose(distributed[name]["loss"], reference["loss"], rtol=1e-6, atol=0), name
        # float32 sums in another order: every tensor within 1e-4 of its largest reference entry
        assert_same_gradients(reference, distributed[name])


def test_torchrun_training_on_uneven_shards(tmp_path):
    """Two processes on shards of 30, 10 and 5 samples take the same steps; only rank 0 writes."""
    for i, count in enumerate((30, 10, 5)):
        write_good_shard(tmp_path / f"s{i}.tar", 100 * i, count)
    overrides = TINY_OVERRIDES + [
        f"data.train={tmp_path}/s{{0..2}}.tar", "data.shuffle_buffer=0", "train.steps=4", "train.checkpoint_every=2",
        "train.device=cpu", "train.output_dir=run",
    ]
    (tmp_path / "config.yaml").write_text(load_config(None, overrides).to_yaml())
    result = _torchrun("-m", "dinorankclip", "train", "--config", "config.yaml", cwd=tmp_path)
    summaries, text = [], result.stdout.strip()
    while text:
        summary, end = json.JSONDecoder().raw_decode(text)
        summaries.append(summary)
        text = text[end:].strip()
    assert [s["steps"] for s in summaries] == [4, 4]  # every process took every step
    # Every log line names its process; only rank 0 logs progress, the other rank only warnings.
    assert " rank 0 INFO dinorankclip" in result.stderr
    assert " rank 1 INFO " not in result.stderr
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    state = json.loads((run / "training_state.json").read_text())
    assert state["world_size"] == 2
    assert state["samples_seen"] == 4 * 8
    checkpoint = json.loads((run / "checkpoints" / "step-00000002" / "training_state.json").read_text())
    assert len(checkpoint["data"]) == 2  # one data position per process
    assert [d["batches"] for d in checkpoint["data"]] == [2, 2]
    # A single process continues the 2-process run from its checkpoint.
    os.chdir(tmp_path)
    try:
        summary = train(load_config(None, overrides + ["train.resume=run/checkpoints/step-00000002",
                                                       "train.output_dir=single"]))
    finally:
        os.chdir(REPO)
    assert summary["steps"] == 4


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ("single", 0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, ("torchrun", 3, 8, 1)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}, ("slurm", 5, 16, 5)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, ("single", 0, 1, 0)),  # a one-task allocation
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"},
         ("torchrun", 9, 16, 1)),  # srun starting one torchrun per node: torchrun's variables win
    ],
)
def test_launcher_detection(monkeypatch, env, expected):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detect_launcher() == expected


def test_slurm_without_master_address_is_explained(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set for a 4-process slurm job"):
        init_distributed("cpu")
