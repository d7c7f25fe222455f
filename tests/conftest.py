"""Shared fixtures: real sample data, tiny configs, and an offline Hugging Face hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup without network hangs for ~47 s

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "src" / "dinorankclip" / "sample_data"
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny but real architectures: the bundled 4-layer trunk, a 2-block DINOv3 ViT-S/16 teacher with random
# weights and a 2-block ViT-Tiny student, at 32 px so one training step takes well under a second.
TINY_OVERRIDES = [
    "model.trunk=dinorankclip-tiny",
    "model.image_size=32",
    "teacher.name=vit_small_patch16_dinov3",
    "teacher.weights=random",
    "teacher.image_size=32",
    "teacher.blocks=[0, 1]",
    "teacher.model_kwargs={depth: 2}",
    "student.model_kwargs={depth: 2}",
    "fusion.width=64",
    "fusion.refiner_heads=2",
    "fusion.gate_hidden=64",
    "loss.top_k=8",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.tensorboard=false",
    "eval.batch_size=64",
]


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the full sample data folder {SHARED_DATA} is absent (only in the development checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    """Overrides for a tiny real model; a tuple, so tests extend it with ``+ (...)`` or ``list(...)``."""
    return tuple(TINY_OVERRIDES)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def encoder(tiny_overrides):
    """An evaluation encoder around a tiny randomly initialised model without fusion (seed 0)."""
    from dinorankclip.config import load_config
    from dinorankclip.eval.features import Encoder
    from dinorankclip.models.dinorankclip import build_model
    from dinorankclip.models.trunk import build_tokenizer

    cfg = load_config(None, list(tiny_overrides) + ["fusion.variant=none"])
    torch.manual_seed(0)
    model = build_model(cfg, None)
    return Encoder(model, build_tokenizer(model.spec), torch.device("cpu"))


@pytest.fixture(scope="module")
def transform(encoder):
    """The evaluation transform of ``encoder``'s model."""
    from dinorankclip.eval.runner import eval_views

    return eval_views(encoder.model)
