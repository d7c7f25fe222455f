"""Build the frozen DINOv3 teacher from a timm model name and a local weights file."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from torch import nn

from dinorankclip.teacher import hf_format
from dinorankclip.teacher.dinov3 import DinoV3Teacher
from dinorankclip.teacher.loading import ACCEPTED_FORMATS, load_teacher_weights

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
# Arguments that would make timm load weights itself (possibly over the network) or change the model's outputs.
FORBIDDEN_MODEL_KWARGS = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "features_only",
    "num_classes",
)


def dinov3_model_names() -> list[str]:
    """Return the timm architectures this teacher accepts (every registered ``*_dinov3*`` model)."""
    return timm.list_models("*_dinov3*")


def _create_model(model_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    architecture = model_name.split(".", 1)[0]
    allowed = dinov3_model_names()
    if architecture not in allowed:
        raise ValueError(f"teacher model {model_name!r} is not a timm DINOv3 model; allowed: {', '.join(allowed)}")
    forbidden = sorted(set(model_kwargs) & set(FORBIDDEN_MODEL_KWARGS))
    if forbidden:
        raise ValueError(
            f"teacher model_kwargs may not set {forbidden}: the teacher loads weights only from its weights path "
            "and returns tokens, not class scores"
        )
    try:
        # pretrained=False: timm never downloads anything; weights come from load_teacher_weights.
        return timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    except (TypeError, AssertionError, ValueError) as error:
        # timm reports unknown arguments as TypeError and inconsistent sizes (depth=-1) through assert.
        reason = str(error) or type(error).__name__
        raise ValueError(
            f"teacher model {model_name!r} rejected teacher.model_kwargs={model_kwargs}: {reason}"
        ) from error


def build_teacher(
    model_name: str,
    weights: str | os.PathLike[str],
    *,
    blocks: Sequence[int] = (-1,),
    autocast_bf16: bool = True,
    **model_kwargs: Any,
) -> DinoV3Teacher:
    """Build a frozen DINOv3 teacher and load its weights from disk.

    Args:
        model_name: a timm DINOv3 architecture, e.g. ``"vit_base_patch16_dinov3"`` or its ``_qkvb`` twin.
        weights: a Meta DINOv3 checkpoint, a timm state dict (``.safetensors`` or ``.pth``) or a Hugging Face
            ``DINOv3ViTModel`` folder. The string ``"random"`` gives an untrained teacher for tests and logs a
            warning.
        blocks: blocks whose patch tokens the teacher returns; negative indices count from the end.
        autocast_bf16: run under bfloat16 autocast on CUDA devices that support it.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2`` for a small test model).

    Returns:
        The teacher, in eval mode with frozen parameters, on the CPU.

    Raises:
        FileNotFoundError: ``weights`` is a path that does not exist.
        ValueError: unknown model name, a Hugging Face config.json that describes another architecture, or
            weights whose keys or shapes do not match the model (the message lists them).
    """
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        model = _create_model(model_name, model_kwargs)
        logger.warning(
            "!!! The DINOv3 teacher %s has RANDOM weights: it is untrained, and distilling from it or injecting "
            "its features teaches the student nothing useful. Use weights='random' only in tests. !!!",
            model_name,
        )
        return DinoV3Teacher(
            model, blocks=blocks, autocast_bf16=autocast_bf16, model_name=model_name, weights=RANDOM_WEIGHTS
        )

    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"teacher weights not found: {path}. Accepted formats: {ACCEPTED_FORMATS}")

    model = _create_model(model_name, model_kwargs)
    if path.is_dir():
        hf_format.check_hf_architecture(model, path, model_name, model_kwargs)
    layout = load_teacher_weights(model, path)
    logger.info("Loaded DINOv3 teacher %s from %s (%s layout)", model_name, path, layout)
    return DinoV3Teacher(model, blocks=blocks, autocast_bf16=autocast_bf16, model_name=model_name, weights=str(path))
