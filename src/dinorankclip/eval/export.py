"""Export a checkpoint's CLIP trunk as a folder that open_clip loads with ``local-dir:``.

The folder contains what open_clip's ``create_model('local-dir:DIR')`` reads (checked against open_clip
3.3.0's ``factory.py``): ``open_clip_config.json`` with ``model_cfg`` (the trunk's architecture with the
input size and context length it was trained with) and ``preprocess_cfg`` (mean, std, interpolation,
resize mode), and the weights as ``open_clip_model.safetensors`` with the state-dict keys of open_clip's
``CLIP``. ``dinorankclip_export.json`` records the source checkpoint and what the export leaves out.

NOTE: only the trunk is exported. The exported model's image embedding equals the checkpoint's
``clip_image_features``, not the fused ``image_features``: the fusion residual needs the student image
branch (or the teacher), which open_clip cannot run. The same holds for the text side when the model has
a text branch.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import open_clip
from safetensors.torch import save_file

from ..models.trunk import register_bundled_configs
from ..train.checkpoint import atomic_write, load_model, resolve_checkpoint

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_open_clip"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME


def export_open_clip(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the trunk of ``checkpoint`` to ``out_dir`` in open_clip's local-dir format.

    Args:
        checkpoint: a run folder or ``model.safetensors``.
        out_dir: the folder to write (created; existing export files are replaced).

    Returns:
        The content of ``dinorankclip_export.json`` (source, trunk name, files, notes).

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ValueError: the trunk is not an open_clip architecture with a known config.
    """
    file = resolve_checkpoint(checkpoint)
    model, cfg = load_model(file, map_location="cpu")
    register_bundled_configs()
    model_cfg = open_clip.get_model_config(cfg.model.trunk)
    if model_cfg is None:
        raise ValueError(f"trunk {cfg.model.trunk!r} has no open_clip model config; it cannot be exported")
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg["vision_cfg"]["image_size"] = model.spec.image_size
    model_cfg["text_cfg"]["context_length"] = model.spec.context_length

    visual = model.trunk.visual
    preprocess_cfg = {"mean": list(model.spec.image_mean), "std": list(model.spec.image_std)}
    for key in ("interpolation", "resize_mode"):
        if key in getattr(visual, "preprocess_cfg", {}):
            preprocess_cfg[key] = visual.preprocess_cfg[key]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trunk.state_dict().items()}
    # Each file is renamed into place with the umask's permissions (safetensors 0.8 writes owner-only files).
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    info = {
        "source_checkpoint": str(file),
        "trunk": cfg.model.trunk,
        "fusion_variant": cfg.fusion.variant,
        "loss": cfg.loss.name,
        "files": [CONFIG_NAME, WEIGHTS_NAME],
        "load_with": f"open_clip.create_model('local-dir:{out}')",
        "note": "Trunk only: the exported embeddings equal the checkpoint's clip_image_features and "
                "clip_text_features. The fused embeddings need the DinoRankCLIP student "
                "(dinorankclip eval --checkpoint on the original run)." if cfg.fusion.enabled else
                "Trunk only; this checkpoint has no fusion, so the exported embeddings are the model's embeddings.",
    }
    _write_json(out / "dinorankclip_export.json", info)
    logger.info("Exported the %s trunk of %s to %s", cfg.model.trunk, file, out)
    return info


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
