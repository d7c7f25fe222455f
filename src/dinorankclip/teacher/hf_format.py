"""Hugging Face ``DINOv3ViTModel`` folders: map ``config.json`` to a timm architecture and the weights to timm names.

Key names and config fields follow transformers' ``models/dinov3_vit/modeling_dinov3_vit.py`` and
``configuration_dinov3_vit.py`` (transformers 4.56 and later):

- q, k and v are separate ``nn.Linear`` layers (``layer.N.attention.{q,k,v}_proj``), and the key projection has
  no bias unless ``key_bias`` is set;
- layer scale is ``layer.N.layer_scaleK.lambda1``;
- the gated MLP computes ``down_proj(act(gate_proj(x)) * up_proj(x))``;
- RoPE (``rope_theta``) has no stored weights.

timm's ``Eva`` fuses q, k and v into one ``qkv`` weight with separate ``q_bias`` and ``v_bias`` and a fixed zero
key bias.

NOTE: transformers is not a dependency, so no test runs ``DINOv3ViTModel`` itself. The tests check the key
mapping by a round trip and the config mapping against the released model configurations. Equal features rest
on timm and transformers both matching Meta's original model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from dinorankclip.teacher.keys import format_keys

HF_MODEL_TYPES = ("dinov3_vit", "DINOv3ViT")
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"

# DINOv3ViTConfig defaults, used for fields a config.json leaves out. Older transformers releases call
# use_gated_mlp "use_swiglu_ffn".
HF_CONFIG_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "rope_theta": 100.0,
    "num_channels": 3,
    "query_bias": True,
    "key_bias": False,
    "value_bias": True,
    "proj_bias": True,
    "mlp_bias": True,
    "use_gated_mlp": False,
    "num_register_tokens": 0,
}

# Standard timm DINOv3 models by (embed_dim, depth, num_heads, gated MLP), without the '_qkvb' suffix.
TIMM_DINOV3_MODELS = {
    (384, 12, 6, False): "vit_small_patch16_dinov3",
    (384, 12, 6, True): "vit_small_plus_patch16_dinov3",
    (768, 12, 12, False): "vit_base_patch16_dinov3",
    (1024, 24, 16, False): "vit_large_patch16_dinov3",
    (1280, 32, 20, True): "vit_huge_plus_patch16_dinov3",
    (4096, 40, 32, True): "vit_7b_patch16_dinov3",
}
# Settings shared by every timm DINOv3 model above except vit_7b (mlp_ratio=2, swiglu_align_to=64).
TIMM_DINOV3_DEFAULTS = {"patch_size": 16, "num_reg_tokens": 4, "rope_temperature": 100.0, "mlp_ratio": 4.0}
TIMM_LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class DinoV3Architecture:
    """The architecture fields that a Hugging Face config and a timm model must agree on."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int
    gated_mlp: bool
    qkv_bias: bool
    patch_size: int
    num_reg_tokens: int
    rope_temperature: float
    layer_norm_eps: float


def read_hf_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` from a Hugging Face model folder and check that it describes a DINOv3 ViT."""
    config_path = folder / "config.json"
    if folder.is_dir() and not any(folder.iterdir()):
        raise FileNotFoundError(
            f"teacher weights folder {folder} is empty; give a weights file or a Hugging Face DINOv3 folder "
            f"(config.json + {HF_WEIGHTS_FILE})"
        )
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder}: a Hugging Face DINOv3 folder needs config.json next to {HF_WEIGHTS_FILE}; not found"
        )
    with config_path.open() as handle:
        config = json.load(handle)
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type is {model_type!r}, expected one of {list(HF_MODEL_TYPES)}")
    return config


def architecture_from_hf_config(config: Mapping[str, Any], source: Path) -> DinoV3Architecture:
    """Map a ``DINOv3ViTConfig`` to the timm architecture fields, rejecting settings timm's ``Eva`` cannot express."""
    values = {**HF_CONFIG_DEFAULTS, **config}
    if "use_gated_mlp" not in config and "use_swiglu_ffn" in config:
        values["use_gated_mlp"] = config["use_swiglu_ffn"]

    gated = bool(values["use_gated_mlp"])
    expected_act = "silu" if gated else "gelu"
    problems = []
    if values["key_bias"]:
        problems.append("key_bias=true (timm's DINOv3 attention has a fixed zero key bias)")
    if not values["proj_bias"]:
        problems.append("proj_bias=false (timm's DINOv3 attention output projection always has a bias)")
    if not values["mlp_bias"]:
        problems.append("mlp_bias=false (timm's DINOv3 MLP layers always have biases)")
    if bool(values["query_bias"]) != bool(values["value_bias"]):
        problems.append(
            f"query_bias={values['query_bias']!r} with value_bias={values['value_bias']!r} "
            "(timm has one qkv_bias switch for both)"
        )
    if values["hidden_act"] != expected_act:
        problems.append(
            f"hidden_act={values['hidden_act']!r} (timm's {'gated' if gated else 'plain'} MLP uses {expected_act!r})"
        )
    if values["num_channels"] != 3:
        problems.append(f"num_channels={values['num_channels']!r} (the teacher takes RGB images)")
    if float(values["layer_norm_eps"]) != TIMM_LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps={values['layer_norm_eps']!r} (timm's DINOv3 models use 1e-05)")
    for field in ("pos_embed_rope_min_period", "pos_embed_rope_max_period"):
        if config.get(field) is not None:
            problems.append(f"{field}={config[field]!r} (only rope_theta periods are supported)")
    if problems:
        raise ValueError(f"{source / 'config.json'}: cannot map to a timm DINOv3 model: " + "; ".join(problems))

    return DinoV3Architecture(
        embed_dim=int(values["hidden_size"]),
        depth=int(values["num_hidden_layers"]),
        num_heads=int(values["num_attention_heads"]),
        mlp_hidden_dim=int(values["intermediate_size"]),
        gated_mlp=gated,
        qkv_bias=bool(values["query_bias"]),
        patch_size=int(values["patch_size"]),
        num_reg_tokens=int(values["num_register_tokens"]),
        rope_temperature=float(values["rope_theta"]),
        layer_norm_eps=float(values["layer_norm_eps"]),
    )


def architecture_of_model(model: nn.Module) -> DinoV3Architecture:
    """Read the architecture fields from a built timm DINOv3 ``Eva`` model."""
    block = model.blocks[0]
    patch_h, _ = model.patch_embed.patch_size
    return DinoV3Architecture(
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_hidden_dim=block.mlp.fc2.in_features,
        gated_mlp=hasattr(block.mlp, "fc1_g"),
        qkv_bias=block.attn.q_bias is not None,
        patch_size=patch_h,
        num_reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        rope_temperature=float(model.rope.temperature),
        layer_norm_eps=float(model.norm.eps),
    )


def timm_args_for_architecture(arch: DinoV3Architecture) -> tuple[str, dict[str, Any]]:
    """Return the timm model name and keyword arguments that build ``arch``.

    A standard size maps to its timm name without arguments; other sizes use the small model of the same MLP
    kind with explicit sizes. ``qkv_bias`` selects the ``_qkvb`` twin.
    """
    suffix = "_qkvb" if arch.qkv_bias else ""
    standard = TIMM_DINOV3_MODELS.get((arch.embed_dim, arch.depth, arch.num_heads, arch.gated_mlp))
    kwargs: dict[str, Any] = {}
    if standard is None:
        standard = "vit_small_plus_patch16_dinov3" if arch.gated_mlp else "vit_small_patch16_dinov3"
        kwargs.update(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads)
    if standard == "vit_7b_patch16_dinov3":
        defaults = {**TIMM_DINOV3_DEFAULTS, "mlp_ratio": 2.0}
    else:
        defaults = TIMM_DINOV3_DEFAULTS
    mlp_ratio = arch.mlp_hidden_dim / arch.embed_dim
    settings = {
        "patch_size": arch.patch_size,
        "num_reg_tokens": arch.num_reg_tokens,
        "rope_temperature": arch.rope_temperature,
        "mlp_ratio": mlp_ratio,
    }
    kwargs.update({key: value for key, value in settings.items() if value != defaults[key]})
    return standard + suffix, kwargs


def check_hf_architecture(model: nn.Module, folder: Path, model_name: str, model_kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``model`` has the architecture that ``folder/config.json`` describes.

    The one accepted difference is a model without q/v biases for a config with them: the bias tensors are then
    loaded only if they are all zero (checked in ``convert_hf_state_dict``).
    """
    config_arch = architecture_from_hf_config(read_hf_config(folder), folder)
    model_arch = architecture_of_model(model)
    config_fields = asdict(config_arch)
    model_fields = asdict(model_arch)
    differences = [
        f"{field}: config.json {config_fields[field]!r}, model {model_fields[field]!r}"
        for field in config_fields
        if config_fields[field] != model_fields[field]
        and not (field == "qkv_bias" and config_fields[field] and not model_fields[field])
    ]
    if differences:
        name, kwargs = timm_args_for_architecture(config_arch)
        raise ValueError(
            f"{folder / 'config.json'} describes a different architecture from model {model_name!r} with "
            f"arguments {dict(model_kwargs)}: "
            + "; ".join(differences)
            + f". Build the teacher as {name!r} with arguments {kwargs}"
        )


def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors``, or every shard listed in ``model.safetensors.index.json``, from ``folder``."""
    single = folder / HF_WEIGHTS_FILE
    index = folder / HF_WEIGHTS_INDEX
    if single.is_file():
        return safetensors.torch.load_file(str(single), device="cpu")
    if index.is_file():
        with index.open() as handle:
            weight_map: dict[str, str] = json.load(handle)["weight_map"]
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(safetensors.torch.load_file(str(folder / shard), device="cpu"))
        return state_dict
    raise FileNotFoundError(
        f"{folder}: no {HF_WEIGHTS_FILE} or {HF_WEIGHTS_INDEX} found; a Hugging Face DINOv3 folder needs "
        "config.json and its weights in safetensors format"
    )


# timm key -> Hugging Face key(s); several keys are concatenated along dim 0 (q, k, v into timm's fused qkv).
_GLOBAL_KEYS = {
    "cls_token": ("embeddings.cls_token",),
    "reg_token": ("embeddings.register_tokens",),
    "patch_embed.proj.weight": ("embeddings.patch_embeddings.weight",),
    "patch_embed.proj.bias": ("embeddings.patch_embeddings.bias",),
    "norm.weight": ("norm.weight",),
    "norm.bias": ("norm.bias",),
}
_BLOCK_SUFFIXES = {
    "norm1.weight": ("norm1.weight",),
    "norm1.bias": ("norm1.bias",),
    "norm2.weight": ("norm2.weight",),
    "norm2.bias": ("norm2.bias",),
    "attn.qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
    "attn.q_bias": ("attention.q_proj.bias",),
    "attn.v_bias": ("attention.v_proj.bias",),
    "attn.proj.weight": ("attention.o_proj.weight",),
    "attn.proj.bias": ("attention.o_proj.bias",),
    "gamma_1": ("layer_scale1.lambda1",),
    "gamma_2": ("layer_scale2.lambda1",),
    "mlp.fc1.weight": ("mlp.up_proj.weight",),
    "mlp.fc1.bias": ("mlp.up_proj.bias",),
    "mlp.fc1_g.weight": ("mlp.gate_proj.weight",),
    "mlp.fc1_g.bias": ("mlp.gate_proj.bias",),
    "mlp.fc1_x.weight": ("mlp.up_proj.weight",),
    "mlp.fc1_x.bias": ("mlp.up_proj.bias",),
    "mlp.fc2.weight": ("mlp.down_proj.weight",),
    "mlp.fc2.bias": ("mlp.down_proj.bias",),
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
# Pretraining-only parameter (masked-image modelling) that feature extraction never uses.
_HF_UNUSED_KEYS = ("embeddings.mask_token",)
_HF_QV_BIAS_KEY = re.compile(r"layer\.\d+\.attention\.[qv]_proj\.bias")


def hf_keys_for_timm_key(timm_key: str) -> tuple[str, ...] | None:
    """Return the Hugging Face key(s) holding ``timm_key``, or ``None`` when the layout has no such tensor."""
    if timm_key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[timm_key]
    match = _BLOCK_KEY.fullmatch(timm_key)
    if match is None or match.group(2) not in _BLOCK_SUFFIXES:
        return None
    index, suffix = match.groups()
    return tuple(f"layer.{index}.{hf_suffix}" for hf_suffix in _BLOCK_SUFFIXES[suffix])


def convert_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], model: nn.Module, folder: Path
) -> dict[str, torch.Tensor]:
    """Convert a ``DINOv3ViTModel`` state dict to timm's names for ``model``.

    Raises:
        ValueError: a tensor the model needs is missing or a tensor is left over (all are listed, in Hugging Face
            names), or a q/v bias is non-zero while the model has no qkv bias.
    """
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for timm_key in model.state_dict():
        hf_keys = hf_keys_for_timm_key(timm_key)
        if hf_keys is None:
            missing.append(f"{timm_key} (timm key with no Hugging Face equivalent)")
            continue
        absent = [key for key in hf_keys if key not in hf_state_dict]
        if absent:
            missing.extend(absent)
            continue
        used.update(hf_keys)
        tensors = [hf_state_dict[key] for key in hf_keys]
        converted[timm_key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)

    model_has_qv_bias = model.blocks[0].attn.q_bias is not None
    unexpected = []
    for key in sorted(set(hf_state_dict) - used):
        if key in _HF_UNUSED_KEYS:
            continue
        if not model_has_qv_bias and _HF_QV_BIAS_KEY.fullmatch(key):
            if hf_state_dict[key].abs().max() > 0:
                raise ValueError(
                    f"{folder}: {key} is non-zero but the model has no qkv bias. Use the timm model name "
                    "ending in '_qkvb' (qkv_bias=True)"
                )
            continue
        unexpected.append(key)

    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {format_keys(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
        raise ValueError(
            f"{folder / HF_WEIGHTS_FILE}: checkpoint does not match the model (Hugging Face names): " + "; ".join(parts)
        )
    return converted
