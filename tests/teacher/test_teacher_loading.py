"""Loading DINOv3 weights in Meta's, timm's and Hugging Face's layouts through ``build_teacher``.

Each test writes a tiny random DINOv3 to disk with the real key names and file names of one layout. The
timm -> Meta and timm -> Hugging Face mappings below are written independently of the package, from the key
names in facebookresearch/dinov3 (``dinov3/models/vision_transformer.py``) and transformers
(``models/dinov3_vit/modeling_dinov3_vit.py``), so a round trip through ``build_teacher`` checks the package's
conversions against them.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from tiny_dinov3 import TINY_KWARGS, TINY_MODEL_NAMES, make_tiny_model, random_images
from torch import nn

from dinorankclip.teacher import DinoV3Teacher, build_teacher
from dinorankclip.teacher.hf_format import (
    architecture_from_hf_config,
    architecture_of_model,
    timm_args_for_architecture,
)

TOLERANCE = 1e-5
FORMATS = ("meta_pth", "timm_safetensors", "timm_pth", "timm_pth_wrapped", "huggingface")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a network connection: loading must work offline."""

    def fail_connection(*args, **kwargs):
        raise AssertionError("teacher loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", fail_connection)
    monkeypatch.setattr(socket, "create_connection", fail_connection)


def is_gated(model: nn.Module) -> bool:
    return hasattr(model.blocks[0].mlp, "fc1_g")


def has_qv_bias(model: nn.Module) -> bool:
    return model.blocks[0].attn.q_bias is not None


def meta_state_dict(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Write ``model``'s weights with the key names and shapes of Meta's ``DinoVisionTransformer``."""
    dim = model.embed_dim
    gated = is_gated(model)
    meta = {}
    for key, value in model.state_dict().items():
        if key == "reg_token":
            meta["storage_tokens"] = value
        elif key.endswith((".attn.q_bias", ".attn.v_bias")):
            continue
        elif key.endswith(".gamma_1"):
            meta[key.replace(".gamma_1", ".ls1.gamma")] = value
        elif key.endswith(".gamma_2"):
            meta[key.replace(".gamma_2", ".ls2.gamma")] = value
        elif ".mlp.fc1_g." in key:
            meta[key.replace(".mlp.fc1_g.", ".mlp.w1.")] = value
        elif ".mlp.fc1_x." in key:
            meta[key.replace(".mlp.fc1_x.", ".mlp.w2.")] = value
        elif gated and ".mlp.fc2." in key:
            meta[key.replace(".mlp.fc2.", ".mlp.w3.")] = value
        else:
            meta[key] = value

    # Meta's LinearKMaskedBias stores a full q|k|v bias and a bias_mask that zeroes the key third at run time, so
    # the stored key bias may hold anything: random values here check that it is ignored.
    generator = torch.Generator().manual_seed(seed)
    for index, block in enumerate(model.blocks):
        if has_qv_bias(model):
            key_bias = torch.randn(dim, generator=generator)
            bias = torch.cat([block.attn.q_bias.detach(), key_bias, block.attn.v_bias.detach()])
        else:
            bias = torch.zeros(3 * dim)
        bias_mask = torch.ones(3 * dim)
        bias_mask[dim : 2 * dim] = 0
        meta[f"blocks.{index}.attn.qkv.bias"] = bias
        meta[f"blocks.{index}.attn.qkv.bias_mask"] = bias_mask

    meta["mask_token"] = torch.zeros(1, dim)
    # The released checkpoints store the RoPE periods in bfloat16.
    meta["rope_embed.periods"] = model.rope.periods.to(torch.bfloat16)
    return meta


def hf_state_dict(model: nn.Module, *, zero_qv_bias: bool = False) -> dict[str, torch.Tensor]:
    """Write ``model``'s weights with the key names and shapes of transformers' ``DINOv3ViTModel``.

    With ``zero_qv_bias``, a model without q/v biases is written with all-zero ``q_proj``/``v_proj`` biases, as
    an HF conversion of a Meta checkpoint with masked biases has them.
    """
    timm_sd = model.state_dict()
    dim = model.embed_dim
    hf = {
        "embeddings.cls_token": timm_sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, 1, dim),
        "embeddings.register_tokens": timm_sd["reg_token"],
        "embeddings.patch_embeddings.weight": timm_sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": timm_sd["patch_embed.proj.bias"],
        "norm.weight": timm_sd["norm.weight"],
        "norm.bias": timm_sd["norm.bias"],
    }
    for index in range(len(model.blocks)):
        src = f"blocks.{index}."
        dst = f"layer.{index}."
        q_weight, k_weight, v_weight = timm_sd[src + "attn.qkv.weight"].chunk(3, dim=0)
        hf[dst + "attention.q_proj.weight"] = q_weight
        hf[dst + "attention.k_proj.weight"] = k_weight
        hf[dst + "attention.v_proj.weight"] = v_weight
        if has_qv_bias(model):
            hf[dst + "attention.q_proj.bias"] = timm_sd[src + "attn.q_bias"]
            hf[dst + "attention.v_proj.bias"] = timm_sd[src + "attn.v_bias"]
        elif zero_qv_bias:
            hf[dst + "attention.q_proj.bias"] = torch.zeros(dim)
            hf[dst + "attention.v_proj.bias"] = torch.zeros(dim)
        hf[dst + "attention.o_proj.weight"] = timm_sd[src + "attn.proj.weight"]
        hf[dst + "attention.o_proj.bias"] = timm_sd[src + "attn.proj.bias"]
        hf[dst + "layer_scale1.lambda1"] = timm_sd[src + "gamma_1"]
        hf[dst + "layer_scale2.lambda1"] = timm_sd[src + "gamma_2"]
        for norm in ("norm1", "norm2"):
            hf[dst + f"{norm}.weight"] = timm_sd[src + f"{norm}.weight"]
            hf[dst + f"{norm}.bias"] = timm_sd[src + f"{norm}.bias"]
        if is_gated(model):
            mlp_names = {"fc1_g": "gate_proj", "fc1_x": "up_proj", "fc2": "down_proj"}
        else:
            mlp_names = {"fc1": "up_proj", "fc2": "down_proj"}
        for timm_name, hf_name in mlp_names.items():
            hf[dst + f"mlp.{hf_name}.weight"] = timm_sd[src + f"mlp.{timm_name}.weight"]
            hf[dst + f"mlp.{hf_name}.bias"] = timm_sd[src + f"mlp.{timm_name}.bias"]
    return {key: value.contiguous() for key, value in hf.items()}


def hf_config(model: nn.Module, *, qv_bias: bool | None = None, **overrides) -> dict:
    """Return a ``config.json`` with every field ``DINOv3ViTConfig`` (transformers 4.57) saves for ``model``."""
    gated = is_gated(model)
    qv_bias = has_qv_bias(model) if qv_bias is None else qv_bias
    config = {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "patch_size": model.patch_embed.patch_size[0],
        "hidden_size": model.embed_dim,
        "intermediate_size": model.blocks[0].mlp.fc2.in_features,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.blocks[0].attn.num_heads,
        "hidden_act": "silu" if gated else "gelu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "rope_theta": 100.0,
        "image_size": 224,
        "num_channels": 3,
        "query_bias": qv_bias,
        "key_bias": False,
        "value_bias": qv_bias,
        "proj_bias": True,
        "mlp_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_gated_mlp": gated,
        "num_register_tokens": model.reg_token.shape[1],
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "pos_embed_rescale": 2.0,
        "torch_dtype": "float32",
        "transformers_version": "4.57.1",
    }
    config.update(overrides)
    return config


def write_hf_folder(folder: Path, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def save_format(model: nn.Module, fmt: str, root: Path) -> Path:
    """Save ``model`` in format ``fmt`` under ``root`` with the file names each ecosystem uses."""
    if fmt == "meta_pth":
        path = root / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
        torch.save(meta_state_dict(model), path)
    elif fmt == "timm_safetensors":
        path = root / "model.safetensors"
        safetensors.torch.save_file(model.state_dict(), str(path))
    elif fmt == "timm_pth":
        path = root / "pytorch_model.pth"
        torch.save(model.state_dict(), path)
    elif fmt == "timm_pth_wrapped":
        path = root / "checkpoint.pth"
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    elif fmt == "huggingface":
        path = write_hf_folder(root / "dinov3-tiny-hf", hf_state_dict(model), hf_config(model))
    else:
        raise AssertionError(fmt)
    return path


def reference_output(model: nn.Module, images: torch.Tensor, blocks=(0, -1)):
    return DinoV3Teacher(model, blocks=blocks)(images)


def assert_same_features(actual, expected, tolerance: float = TOLERANCE) -> None:
    torch.testing.assert_close(actual.cls, expected.cls, atol=tolerance, rtol=0)
    torch.testing.assert_close(actual.patch, expected.patch, atol=tolerance, rtol=0)
    assert len(actual.patch_levels) == len(expected.patch_levels)
    for actual_level, expected_level in zip(actual.patch_levels, expected.patch_levels, strict=True):
        torch.testing.assert_close(actual_level, expected_level, atol=tolerance, rtol=0)
    assert actual.grid_size == expected.grid_size


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model_name", TINY_MODEL_NAMES)
def test_formats_agree_with_source_model(tmp_path, model_name, fmt):
    model = make_tiny_model(model_name, seed=3)
    images = random_images(2, 64, 48)
    expected = reference_output(model, images)

    path = save_format(model, fmt, tmp_path)
    teacher = build_teacher(model_name, path, blocks=(0, -1), **TINY_KWARGS)

    assert_same_features(teacher(images), expected)
    assert teacher.weights == str(path)


def test_swapped_query_key_changes_features(tmp_path):
    """A q/k mix-up in a checkpoint loads without a key error, so the feature comparison must catch it."""
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb", seed=3)
    images = random_images(2, 64, 48)
    expected = reference_output(model, images)

    state_dict = hf_state_dict(model)
    state_dict["layer.0.attention.q_proj.weight"], state_dict["layer.0.attention.k_proj.weight"] = (
        state_dict["layer.0.attention.k_proj.weight"],
        state_dict["layer.0.attention.q_proj.weight"],
    )
    folder = write_hf_folder(tmp_path / "swapped", state_dict, hf_config(model))
    actual = build_teacher("vit_small_patch16_dinov3_qkvb", folder, blocks=(0, -1), **TINY_KWARGS)(images)

    assert (actual.patch - expected.patch).abs().max() > 1e-2


def write_state_dict(fmt: str, state_dict: dict, model: nn.Module, root: Path) -> Path:
    if fmt == "meta_pth":
        path = root / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
        torch.save(state_dict, path)
        return path
    if fmt == "timm_safetensors":
        path = root / "model.safetensors"
        safetensors.torch.save_file(state_dict, str(path))
        return path
    return write_hf_folder(root / "hf", state_dict, hf_config(model))


STATE_DICT_WRITERS = {
    "meta_pth": meta_state_dict,
    "timm_safetensors": lambda model: dict(model.state_dict()),
    "huggingface": hf_state_dict,
}
# A key that every layout has, in that layout's own naming, and the name the error message uses.
MISSING_KEYS = {
    "meta_pth": ("blocks.1.mlp.fc2.bias", "blocks.1.mlp.fc2.bias"),
    "timm_safetensors": ("blocks.1.gamma_2", "blocks.1.gamma_2"),
    "huggingface": ("layer.1.attention.k_proj.weight", "layer.1.attention.k_proj.weight"),
}
EXTRA_KEYS = {
    "meta_pth": "blocks.0.attn.extra_scale",
    "timm_safetensors": "blocks.0.attn.extra_scale",
    "huggingface": "layer.0.attention.extra_scale",
}


@pytest.mark.parametrize("fmt", sorted(STATE_DICT_WRITERS))
def test_missing_key_is_named(tmp_path, fmt):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    state_dict = STATE_DICT_WRITERS[fmt](model)
    removed, reported = MISSING_KEYS[fmt]
    del state_dict[removed]
    path = write_state_dict(fmt, state_dict, model, tmp_path)

    with pytest.raises(ValueError, match="missing keys") as error:
        build_teacher("vit_small_patch16_dinov3_qkvb", path, **TINY_KWARGS)
    assert reported in str(error.value)


@pytest.mark.parametrize("fmt", sorted(STATE_DICT_WRITERS))
def test_unexpected_key_is_named(tmp_path, fmt):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    state_dict = STATE_DICT_WRITERS[fmt](model)
    state_dict[EXTRA_KEYS[fmt]] = torch.ones(3)
    path = write_state_dict(fmt, state_dict, model, tmp_path)

    with pytest.raises(ValueError, match="unexpected keys") as error:
        build_teacher("vit_small_patch16_dinov3_qkvb", path, **TINY_KWARGS)
    assert EXTRA_KEYS[fmt] in str(error.value)


def test_wrong_shape_is_named(tmp_path):
    path = save_format(make_tiny_model("vit_small_patch16_dinov3"), "timm_safetensors", tmp_path)
    with pytest.raises(ValueError, match="wrong shape") as error:
        build_teacher("vit_small_patch16_dinov3", path, **{**TINY_KWARGS, "embed_dim": 32})
    assert "cls_token (1, 1, 64) vs model (1, 1, 32)" in str(error.value)


def test_missing_file_names_path_and_formats(tmp_path):
    path = tmp_path / "no_such_teacher.pth"
    with pytest.raises(FileNotFoundError) as error:
        build_teacher("vit_small_patch16_dinov3", path, **TINY_KWARGS)
    message = str(error.value)
    assert str(path) in message
    for fmt in ("Meta DINOv3 checkpoint", "timm state dict", "Hugging Face DINOv3ViTModel folder"):
        assert fmt in message


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    model = make_tiny_model("vit_small_patch16_dinov3")
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(model.state_dict(), good_pth)
    safetensors.torch.save_file(model.state_dict(), str(good_st))
    files = {
        "empty.pth": b"",
        "random.pth": bytes(range(256)) * 20,
        "truncated.pth": good_pth.read_bytes()[: good_pth.stat().st_size // 2],
        "random.safetensors": bytes(range(256)) * 2,
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize(
    "name", ["empty.pth", "random.pth", "truncated.pth", "random.safetensors", "truncated.safetensors"]
)
def test_damaged_weights_file_named(tmp_path, name):
    path = _damaged_files(tmp_path)[name]
    with pytest.raises(ValueError) as error:
        build_teacher("vit_small_patch16_dinov3", path, **TINY_KWARGS)
    message = str(error.value)
    assert str(path) in message
    assert "empty" in message or "truncated or corrupt" in message
    assert "weights_only" not in message  # not mistaken for a pickle with foreign objects


def test_empty_weights_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher weights folder .* is empty"):
        build_teacher("vit_small_patch16_dinov3", tmp_path, **TINY_KWARGS)


class NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must reject."""


def test_pth_loads_with_weights_only(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3")
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": model.state_dict(), "extra": NotATensor()}, path)

    with pytest.raises(ValueError, match="weights_only=True"):
        build_teacher("vit_small_patch16_dinov3", path, **TINY_KWARGS)


def test_unknown_file_type_rejected(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown weights file type '.npz'"):
        build_teacher("vit_small_patch16_dinov3", path, **TINY_KWARGS)


def test_hf_file_without_folder_rejected(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(hf_state_dict(model), str(path))
    with pytest.raises(ValueError, match="pass its folder"):
        build_teacher("vit_small_patch16_dinov3_qkvb", path, **TINY_KWARGS)


def test_hf_folder_needs_config_and_weights(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    folder = write_hf_folder(tmp_path / "hf", hf_state_dict(model), hf_config(model))

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        build_teacher("vit_small_patch16_dinov3_qkvb", folder, **TINY_KWARGS)

    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_teacher("vit_small_patch16_dinov3_qkvb", folder, **TINY_KWARGS)


def test_hf_sharded_folder_loads(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb", seed=5)
    images = random_images(1, 32, 32)
    state_dict = hf_state_dict(model)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(model)))
    keys = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        safetensors.torch.save_file({key: state_dict[key] for key in shard_keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(shard_keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    teacher = build_teacher("vit_small_patch16_dinov3_qkvb", folder, blocks=(0, -1), **TINY_KWARGS)
    assert_same_features(teacher(images), reference_output(model, images))


def test_hf_config_mismatch_suggests_model(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    folder = write_hf_folder(tmp_path / "hf", hf_state_dict(model), hf_config(model))

    with pytest.raises(ValueError) as error:
        build_teacher("vit_small_patch16_dinov3_qkvb", folder)
    message = str(error.value)
    assert "embed_dim: config.json 64, model 384" in message
    assert "depth: config.json 2, model 12" in message
    assert "'vit_small_patch16_dinov3_qkvb' with arguments {'embed_dim': 64, 'depth': 2, 'num_heads': 2}" in message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"key_bias": True}, "key_bias"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"query_bias": True, "value_bias": False}, "value_bias"),
        ({"proj_bias": False}, "proj_bias"),
        ({"mlp_bias": False}, "mlp_bias"),
        ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
        ({"num_channels": 4}, "num_channels"),
        ({"model_type": "dinov2"}, "model_type"),
    ],
)
def test_hf_unmappable_config_rejected(tmp_path, override, field):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    folder = write_hf_folder(tmp_path / "hf", hf_state_dict(model), hf_config(model, **override))
    with pytest.raises(ValueError, match=field):
        build_teacher("vit_small_patch16_dinov3_qkvb", folder, **TINY_KWARGS)


def test_hf_zero_bias_loads_into_plain_twin(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3", seed=2)
    images = random_images(1, 48, 48)
    state_dict = hf_state_dict(model, zero_qv_bias=True)
    folder = write_hf_folder(tmp_path / "hf", state_dict, hf_config(model, qv_bias=True))

    teacher = build_teacher("vit_small_patch16_dinov3", folder, blocks=(0, -1), **TINY_KWARGS)
    assert_same_features(teacher(images), reference_output(model, images))


def test_hf_nonzero_bias_rejected_by_plain_twin(tmp_path):
    model = make_tiny_model("vit_small_patch16_dinov3_qkvb")
    folder = write_hf_folder(tmp_path / "hf", hf_state_dict(model), hf_config(model))
    with pytest.raises(ValueError, match=r"layer\.0\.attention\.q_proj\.bias is non-zero.*_qkvb"):
        build_teacher("vit_small_patch16_dinov3", folder, **TINY_KWARGS)


def test_meta_nonzero_bias_rejected_by_plain_twin(tmp_path):
    path = save_format(make_tiny_model("vit_small_patch16_dinov3_qkvb"), "meta_pth", tmp_path)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.bias has non-zero query/value biases.*_qkvb"):
        build_teacher("vit_small_patch16_dinov3", path, **TINY_KWARGS)


def test_meta_patch_size_mismatch_rejected(tmp_path):
    """timm's filter would resample a 16-pixel patch embedding to 8 pixels, so the teacher must reject it instead."""
    path = save_format(make_tiny_model("vit_small_patch16_dinov3"), "meta_pth", tmp_path)
    with pytest.raises(ValueError, match="patch_embed.proj.weight has shape"):
        build_teacher("vit_small_patch16_dinov3", path, patch_size=8, **TINY_KWARGS)


def test_meta_rope_periods_mismatch_rejected(tmp_path):
    path = save_format(make_tiny_model("vit_small_patch16_dinov3"), "meta_pth", tmp_path)
    with pytest.raises(ValueError, match="rope_embed.periods"):
        build_teacher("vit_small_patch16_dinov3", path, rope_temperature=1000.0, **TINY_KWARGS)


# Architectures of the released DINOv3 models as transformers' convert_dinov3_vit_to_hf.py configures them,
# with the timm model each one must map to.
RELEASED_HF_CONFIGS = [
    (
        {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "use_gated_mlp": False,
            "hidden_act": "gelu",
        },
        "vit_small_patch16_dinov3_qkvb",
    ),
    (
        {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "use_gated_mlp": True,
            "hidden_act": "silu",
        },
        "vit_small_plus_patch16_dinov3_qkvb",
    ),
    (
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "use_gated_mlp": False,
            "hidden_act": "gelu",
        },
        "vit_base_patch16_dinov3_qkvb",
    ),
    (
        {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "use_gated_mlp": False,
            "hidden_act": "gelu",
        },
        "vit_large_patch16_dinov3_qkvb",
    ),
    (
        {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "use_gated_mlp": True,
            "hidden_act": "silu",
        },
        "vit_huge_plus_patch16_dinov3_qkvb",
    ),
    (
        {
            "hidden_size": 4096,
            "intermediate_size": 8192,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "use_gated_mlp": True,
            "hidden_act": "silu",
            "query_bias": False,
            "value_bias": False,
        },
        "vit_7b_patch16_dinov3",
    ),
]


@pytest.mark.parametrize(("fields", "expected_name"), RELEASED_HF_CONFIGS)
def test_released_hf_configs_map_to_timm(fields, expected_name):
    config = {"model_type": "dinov3_vit", "patch_size": 16, "num_register_tokens": 4, **fields}
    config_arch = architecture_from_hf_config(config, Path("released"))

    name, kwargs = timm_args_for_architecture(config_arch)
    assert (name, kwargs) == (expected_name, {})

    # Built on the meta device: only the module structure is needed, not 7B parameters of memory.
    model = timm.create_model(name, pretrained=False, num_classes=0, device="meta")
    assert architecture_of_model(model) == config_arch


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="dinorankclip.teacher"):
        teacher = build_teacher("vit_small_patch16_dinov3", "random", **TINY_KWARGS)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "RANDOM weights" in warnings[0].getMessage()
    assert "untrained" in warnings[0].getMessage()
    assert teacher.weights == "random"


def test_unknown_model_name_lists_allowed():
    with pytest.raises(ValueError, match="vit_base_patch16_dinov3_qkvb") as error:
        build_teacher("vit_base_patch16_224", "random")
    assert "not a timm DINOv3 model" in str(error.value)


def test_pretrained_kwarg_rejected():
    with pytest.raises(ValueError, match="pretrained"):
        build_teacher("vit_small_patch16_dinov3", "random", pretrained=True, **TINY_KWARGS)


@pytest.mark.parametrize(("model_kwargs", "fragment"), [
    ({"bogus": 1}, "bogus"),
    ({"depth": -1}, "num_kv_heads"),  # timm checks the sizes with assert
])
def test_rejected_model_kwargs_name_key(model_kwargs, fragment):
    with pytest.raises(ValueError) as err:
        build_teacher("vit_small_patch16_dinov3", "random", **model_kwargs)
    assert "rejected teacher.model_kwargs=" in str(err.value)
    assert fragment in str(err.value)
