"""CLIP trunk built from open_clip model definitions.

The trunk is a plain open_clip ``CLIP`` model: RN50 (the CC3M default of CLIP, CyCLIP and RankCLIP),
ViT-B-32, ViT-B-16, or one of the small configurations bundled in ``trunk_configs/`` for CPU runs
(``dinorankclip-tiny``). Weights come only from a local file; nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from ..config import ConfigError, ModelConfig

__all__ = ["TrunkSpec", "build_trunk", "build_tokenizer", "register_bundled_configs"]

logger = logging.getLogger(__name__)

BUNDLED_CONFIGS = Path(__file__).resolve().parent / "trunk_configs"
_registered = False


def register_bundled_configs() -> None:
    """Make the bundled trunk configs (``dinorankclip-tiny`` ...) known to ``open_clip.create_model``."""
    global _registered
    if not _registered:
        open_clip.add_model_config(BUNDLED_CONFIGS)
        _registered = True


@dataclass(frozen=True)
class TrunkSpec:
    """What the data pipeline and the fusion module need to know about a trunk."""

    name: str
    embed_dim: int
    image_size: int
    context_length: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def _validate_name(name: str) -> None:
    register_bundled_configs()
    if name not in open_clip.list_models():
        known = [m for m in open_clip.list_models() if m.startswith(("RN", "ViT-B", "ViT-L", "dinorankclip"))]
        raise ConfigError(f"model.trunk={name!r} is not an open_clip architecture; for example: {', '.join(known)}")


def build_trunk(cfg: ModelConfig) -> tuple[nn.Module, TrunkSpec]:
    """Create the open_clip trunk described by ``cfg``.

    Returns:
        The ``open_clip.CLIP`` model (logit scale initialised to ``cfg.init_logit_scale``) and its spec.

    Raises:
        ConfigError: unknown architecture.
        FileNotFoundError: ``cfg.pretrained`` names a file that does not exist.
    """
    _validate_name(cfg.trunk)
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(
            f"model.pretrained={cfg.pretrained!r} does not exist; give a local open_clip checkpoint "
            "(.pt, .bin or .safetensors) or null to train from scratch"
        )
    model = open_clip.create_model(
        cfg.trunk,
        pretrained=cfg.pretrained,
        force_image_size=cfg.image_size,
        force_context_length=cfg.context_length,
        output_dict=True,
    )
    if cfg.pretrained is None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    else:
        logger.info("Loaded trunk weights from %s", cfg.pretrained)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)

    preprocess = model.visual.preprocess_cfg
    image_size = preprocess["size"]
    if isinstance(image_size, (tuple, list)):
        if image_size[0] != image_size[1]:
            raise ConfigError(
                f"model.trunk={cfg.trunk!r} has a non-square input {image_size}; only square inputs are supported"
            )
        image_size = image_size[0]
    spec = TrunkSpec(
        name=cfg.trunk,
        embed_dim=model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor)
        else model.text_projection.out_features,
        image_size=int(image_size),
        context_length=int(model.context_length),
        image_mean=tuple(preprocess["mean"]),
        image_std=tuple(preprocess["std"]),
    )
    return model, spec


def build_tokenizer(spec: TrunkSpec):
    """Return open_clip's tokenizer for the trunk with the trunk's context length (bundled BPE vocabulary)."""
    register_bundled_configs()
    return open_clip.get_tokenizer(spec.name, context_length=spec.context_length)
