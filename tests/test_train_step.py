"""One training step: gradient accumulation, gradient checkpointing and the non-finite guard."""

from __future__ import annotations

import json

import pytest
import torch
from ddp_gradient_worker import single_process_gradients as gradients
from train_helpers import one_thread  # noqa: F401

from dinorankclip.config import load_config
from dinorankclip.train.trainer import NonFiniteLossError, train

ALIP = ("loss.name=alip", "fusion.variant=none", "data.second_caption_column=caption2")


def assert_same_gradients(reference: dict, other: dict, rtol: float = 1e-4) -> None:
    """Every tensor agrees to ``rtol`` of its largest reference entry (float32 sums in another order)."""
    assert set(reference) == set(other)
    for name, ref in reference.items():
        bound = rtol * max(ref.abs().max().item(), 1e-3)
        diff = (ref - other[name]).abs().max().item()
        assert diff <= bound, f"{name}: max difference {diff:.3g} > {bound:.3g}"


@pytest.mark.parametrize("overrides", [(), ALIP], ids=["dinorankclip", "alip"])
def test_accumulation_matches_big_batch(overrides):
    one = gradients(1, overrides)  # one batch of 8
    four = gradients(4, overrides)  # 4 micro-batches of 2
    assert torch.allclose(one["loss"], four["loss"], rtol=1e-6, atol=0)
    assert_same_gradients(one, four)  # includes the objective's gradients and ALIP's running means


def test_grad_checkpointing_same_gradients():
    plain = gradients(1)
    checkpointed = gradients(1, ("model.grad_checkpointing=true",))
    assert_same_gradients(plain, checkpointed)


def test_nonfinite_losses_stop_with_step_and_terms(tmp_path, tiny_overrides, sample_data):
    # lr 1e30 makes the first update overflow the weights, so every later loss is NaN.
    cfg = load_config(None, list(tiny_overrides) + [
        "fusion.variant=none", f"data.train={sample_data / 'flickr8k' / 'train.csv'}", "train.lr=1e30",
        "train.steps=10", "train.max_nonfinite_steps=2", f"train.output_dir={tmp_path / 'run'}",
    ])
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "2 steps in a row" in message
    assert "step 2" in message  # step 1 updated the weights; steps 2 and 3 were skipped, both numbered 2
    assert "clip=nan" in message
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]


def test_time_budget_stops_run(tmp_path, tiny_overrides, sample_data):
    cfg = load_config(None, list(tiny_overrides) + [
        "fusion.variant=none", f"data.train={sample_data / 'flickr8k' / 'train.csv'}", "train.steps=50",
        "train.time_budget_minutes=0.001", f"train.output_dir={tmp_path / 'run'}",
    ])
    summary = train(cfg)
    # 0.06 s is spent by the first step, so the run stops there and still writes its model.
    assert summary["steps"] == 1
    assert summary["total_steps"] == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()
