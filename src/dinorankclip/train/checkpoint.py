"""Checkpoint files, all written atomically (temporary file in the same folder, then ``os.replace``).

A run folder holds:

* ``config.yaml``: the resolved configuration;
* ``model.safetensors``: the model's weights without any teacher tensor, with the config and the teacher
  geometry in the safetensors metadata, so :func:`load_model` rebuilds the model without a teacher;
* ``training_state.json``: step, schedule length, elapsed time and data counters;
* ``checkpoints/step-NNNNNNNN/``: resumable checkpoints (see ``resume.py``).

State-dict keys never carry the ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefixes:
saving unwraps the model and loading strips them from files written by other tools.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from ..config import Config, config_from_dict
from ..models.dinorankclip import DinoRankCLIP, TeacherGeometry, build_model

__all__ = [
    "atomic_write",
    "clean_state_dict",
    "load_model",
    "read_model_metadata",
    "save_model",
    "write_json",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it, so it is put back at once
    os.umask(mask)
    return mask


# Read once at import, because setting the umask briefly to 0 is not safe while other threads create files.
_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one rename.

    A crash at any point leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only; give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes from every key."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
            key = key.replace("._orig_mod.", ".")
        cleaned[key] = value
    return cleaned


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(path: str | Path, model: nn.Module, cfg: Config) -> None:
    """Save the model's weights (never teacher weights) with config and geometry metadata."""
    model = unwrap(model)
    state = clean_state_dict(model.state_dict())
    teacher_keys = [k for k in state if k.startswith("teacher.") or ".teacher." in k]
    if teacher_keys:
        raise RuntimeError(f"refusing to save teacher tensors in a model checkpoint: {teacher_keys[:5]}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    geometry = model.geometry.to_dict() if getattr(model, "geometry", None) is not None else None
    metadata = {
        "format": "dinorankclip",
        "config": json.dumps(cfg.to_dict()),
        "geometry": json.dumps(geometry),
    }
    blob = _sorted_header(save(tensors, metadata=metadata))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def _sorted_header(blob: bytes) -> bytes:
    """Rewrite a safetensors file's JSON header with sorted keys.

    safetensors (0.8.0) writes the metadata map in hash order, which changes between processes, so the
    same weights would give different bytes. Sorted keys make the file a function of its content.
    Offsets in the header are relative to the data section, so a new header length keeps them valid.
    """
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + blob[8 + length:]


def read_model_metadata(path: str | Path) -> tuple[Config, TeacherGeometry | None]:
    """Read the config and teacher geometry stored in a ``model.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; give a run folder or a model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != "dinorankclip":
        raise ValueError(f"{path} is not a DinoRankCLIP checkpoint (no 'format: dinorankclip' metadata)")
    cfg = config_from_dict(json.loads(metadata["config"]))
    geometry_data = json.loads(metadata.get("geometry", "null"))
    geometry = TeacherGeometry.from_dict(geometry_data) if geometry_data else None
    return cfg, geometry


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder or a ``.safetensors`` file and return the model file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; give a run folder or a model.safetensors")
    return path


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[DinoRankCLIP, Config]:
    """Rebuild a model from a checkpoint file or run folder; no teacher file is needed.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        RuntimeError: the weights do not match the architecture in the metadata (keys listed).
    """
    from safetensors.torch import load_file

    file = resolve_checkpoint(path)
    cfg, geometry = read_model_metadata(file)
    model = build_model(cfg, geometry)
    state = clean_state_dict(load_file(str(file), device=str(map_location)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{file}: weights do not match the model; missing keys {missing}, unexpected {unexpected}")
    return model.to(map_location).eval(), cfg
