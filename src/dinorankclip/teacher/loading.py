"""Read DINOv3 weights from disk and load them into a timm DINOv3 model, strictly.

Three layouts are accepted:

- Meta's original checkpoints from facebookresearch/dinov3 (``cls_token``, ``storage_tokens``,
  ``blocks.N.attn.qkv.bias_mask``, ``blocks.N.ls1.gamma``, ``rope_embed.periods``, ``mask_token``, ...), converted
  with timm's own ``timm.models.eva.checkpoint_filter_fn``;
- timm's own state dict (``reg_token``, ``blocks.N.gamma_1``, ...), as ``.safetensors`` or a torch pickle;
- a Hugging Face ``DINOv3ViTModel`` folder (``config.json`` + ``model.safetensors``), see ``hf_format``.

Every path ends in the same check: the converted state dict must have exactly the model's keys and shapes.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from safetensors import SafetensorError
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from dinorankclip.teacher import hf_format
from dinorankclip.teacher.keys import format_keys

logger = logging.getLogger(__name__)

WeightsLayout = Literal["meta", "timm", "huggingface"]

ACCEPTED_FORMATS = (
    "a Meta DINOv3 checkpoint (.pth with keys such as storage_tokens and blocks.0.ls1.gamma), "
    "a timm state dict (.safetensors, .pth, .pt or .bin), "
    "or a Hugging Face DINOv3ViTModel folder (config.json + model.safetensors)"
)
TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Wrappers that training scripts put around a state dict, in the order timm's checkpoint helpers unwrap them.
WRAPPER_KEYS = ("model_ema", "model", "module", "state_dict")


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Return the flat ``name -> tensor`` mapping inside a loaded checkpoint, unwrapping one known wrapper key."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return dict(obj)
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            logger.info("%s: using the state dict stored under %r", path, key)
            return dict(inner)
    raise ValueError(
        f"{path}: no state dict found; top-level keys are {format_keys(sorted(map(str, obj)))}. "
        f"Expected a flat mapping of tensors or one wrapped under one of {list(WRAPPER_KEYS)}"
    )


def _corrupt_file_message(path: Path, error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError):
        reason = "not a torch checkpoint"  # torch's own message only suggests weights_only=False
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"{path}: not a readable weights file; it may be truncated or corrupt ({reason[:200]}). "
        f"Download or copy it again. Accepted formats: {ACCEPTED_FORMATS}"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch pickle (with ``weights_only=True``) into a CPU state dict."""
    suffix = path.suffix.lower()
    if suffix in (".safetensors", *TORCH_PICKLE_SUFFIXES) and path.stat().st_size == 0:
        raise ValueError(f"{path}: the weights file is empty (0 bytes); download or copy it again")
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise ValueError(_corrupt_file_message(path, error)) from error
    if suffix in TORCH_PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "Unsupported global" not in str(error):  # not a pickle at all, e.g. random or HTML bytes
                raise ValueError(_corrupt_file_message(path, error)) from error
            raise ValueError(
                f"{path}: torch.load(weights_only=True) rejected the file because it contains objects other than "
                f"tensors and plain containers. Re-save only the state dict, e.g. "
                f"torch.save(model.state_dict(), path). Loader message: {error}"
            ) from error
        except (EOFError, RuntimeError) as error:  # a truncated pickle or zip archive
            raise ValueError(_corrupt_file_message(path, error)) from error
        return _unwrap_state_dict(obj, path)
    raise ValueError(f"{path}: unknown weights file type {suffix!r}. Accepted formats: {ACCEPTED_FORMATS}")


def detect_layout(state_dict: Mapping[str, torch.Tensor], path: Path) -> WeightsLayout:
    """Tell Meta's, timm's and Hugging Face's DINOv3 key layouts apart by their distinctive keys."""
    keys = state_dict.keys()
    if "embeddings.cls_token" in keys or any(key.startswith("layer.0.attention.") for key in keys):
        return "huggingface"
    if "storage_tokens" in keys or "rope_embed.periods" in keys or any(".ls1.gamma" in key for key in keys):
        return "meta"
    if "cls_token" in keys:
        return "timm"
    raise ValueError(
        f"{path}: unrecognised checkpoint layout (first keys: {format_keys(sorted(keys))}). "
        f"Accepted formats: {ACCEPTED_FORMATS}"
    )


def _drop_zero_meta_qkv_biases(state_dict: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Remove ``qkv.bias`` entries for a model without q/v biases, after checking they change nothing.

    Meta's checkpoints store a ``qkv.bias`` whose key third is masked out by ``bias_mask``. For a model without
    q/v biases, timm's filter drops it without looking at the values and prints a message. Dropping it here first
    keeps the output clean and rejects a checkpoint whose query or value bias is not zero.
    """
    if model.blocks[0].attn.q_bias is not None:
        return
    for key in [k for k in state_dict if k.endswith("attn.qkv.bias")]:
        q_bias, _, v_bias = state_dict.pop(key).chunk(3, dim=-1)
        if q_bias.abs().max() > 0 or v_bias.abs().max() > 0:
            raise ValueError(
                f"{path}: {key} has non-zero query/value biases, but the model has no qkv bias. "
                "Use the timm model name ending in '_qkvb' (qkv_bias=True)"
            )


def convert_meta_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, path: Path
) -> dict[str, torch.Tensor]:
    """Convert a Meta DINOv3 state dict to timm's names with ``timm.models.eva.checkpoint_filter_fn``.

    The filter would silently change three things, so they are checked before it runs. It resamples a patch
    embedding of another size, drops RoPE periods that differ from the model's, and drops non-zero q/v biases
    for a model without them.
    """
    state_dict = dict(state_dict)
    if "storage_tokens" not in state_dict:
        raise ValueError(
            f"{path}: Meta DINOv3 checkpoint without storage_tokens; timm converts Meta checkpoints only when the "
            "register ('storage') tokens are present"
        )

    expected_patch = tuple(model.patch_embed.proj.weight.shape)
    found_patch = (
        tuple(state_dict["patch_embed.proj.weight"].shape) if "patch_embed.proj.weight" in state_dict else None
    )
    if found_patch is not None and found_patch != expected_patch:
        raise ValueError(
            f"{path}: patch_embed.proj.weight has shape {found_patch} but the model expects {expected_patch}; "
            "the checkpoint has another patch size or width than the model"
        )

    periods = state_dict.get("rope_embed.periods")
    if periods is not None:
        model_periods = model.rope.periods.detach().float().cpu()
        # Released checkpoints store the periods in bfloat16 (relative error up to 2**-9); timm recomputes them.
        if periods.shape != model_periods.shape or not torch.allclose(periods.float(), model_periods, rtol=1e-2):
            raise ValueError(
                f"{path}: rope_embed.periods in the checkpoint {periods.float().tolist()} differ from the model's "
                f"RoPE periods {model_periods.tolist()} (rope_temperature={model.rope.temperature}); the checkpoint "
                "was trained with another RoPE base or head width"
            )

    _drop_zero_meta_qkv_biases(state_dict, model, path)
    return checkpoint_filter_fn(state_dict, model)


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, path: Path, layout: WeightsLayout
) -> None:
    """Copy ``state_dict`` into ``model`` after checking that keys and shapes match exactly.

    Raises:
        ValueError: listing every missing, unexpected or mis-shaped key, in timm's names (after conversion from
            ``layout``).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
        naming = "timm names" if layout == "timm" else f"timm names after conversion from the {layout} layout"
        raise ValueError(f"{path}: checkpoint does not match the model ({naming}): " + "; ".join(parts))

    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if state_dict[key].shape != tensor.shape
    ]
    if mismatched:
        raise ValueError(f"{path}: checkpoint tensors with the wrong shape: {format_keys(mismatched)}")

    model.load_state_dict(state_dict, strict=True)


def load_teacher_weights(model: nn.Module, path: Path) -> WeightsLayout:
    """Load DINOv3 weights from ``path`` into ``model`` in any accepted layout.

    Args:
        model: a timm DINOv3 ``Eva`` model.
        path: a checkpoint file or a Hugging Face model folder.

    Returns:
        The layout that was read.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a Hugging Face folder lacks a required file.
        ValueError: the file cannot be read in any accepted layout, or its keys or shapes do not match the model.
    """
    if not path.exists():
        raise FileNotFoundError(f"teacher weights not found: {path}. Accepted formats: {ACCEPTED_FORMATS}")

    if path.is_dir():
        try:
            hf_state_dict = hf_format.read_hf_state_dict(path)
        except SafetensorError as error:
            raise ValueError(_corrupt_file_message(path, error)) from error
        state_dict = hf_format.convert_hf_state_dict(hf_state_dict, model, path)
        layout: WeightsLayout = "huggingface"
    else:
        state_dict = read_state_dict(path)
        layout = detect_layout(state_dict, path)
        if layout == "huggingface":
            raise ValueError(
                f"{path}: this file has the Hugging Face DINOv3ViTModel layout; pass its folder "
                "(config.json + model.safetensors) so that config.json can be checked against the model"
            )
        if layout == "meta":
            state_dict = convert_meta_state_dict(state_dict, model, path)

    load_state_dict_strict(model, state_dict, path=path, layout=layout)
    return layout
