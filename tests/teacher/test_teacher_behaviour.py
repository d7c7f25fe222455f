"""Behaviour of the frozen DINOv3 teacher: eval mode, no gradient, normalisation, token layout, input sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_dinov3 import TINY_KWARGS, make_tiny_model, random_images
from torch import nn

from dinorankclip.teacher import DinoV3Teacher, TeacherOutput, teacher_input_size
from dinorankclip.teacher.dinov3 import IMAGENET_MEAN, IMAGENET_STD

NUM_PREFIX_TOKENS = 5  # CLS + 4 registers in every timm DINOv3 model


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def teacher() -> DinoV3Teacher:
    return DinoV3Teacher(make_tiny_model("vit_small_patch16_dinov3_qkvb", seed=7), blocks=(0, -1))


def test_output_matches_timm_forward_features(teacher):
    """CLS and patch tokens equal timm's final-normed tokens on ImageNet-normalised input, registers removed."""
    images = random_images(2, 64, 80)
    output = teacher(images)

    tokens = teacher.model.forward_features(normalise(images))  # [B, 5 + P, D], final norm applied
    torch.testing.assert_close(output.cls, tokens[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(output.patch, tokens[:, NUM_PREFIX_TOKENS:], atol=1e-5, rtol=0)
    assert output.patch.shape == (2, 4 * 5, TINY_KWARGS["embed_dim"])
    assert output.grid_size == (4, 5)


def test_intermediate_level_is_normed_block_output(teacher):
    """``patch_levels[0]`` is block 0's patch tokens after the final LayerNorm, computed here block by block."""
    images = random_images(2, 48, 48)
    output = teacher(images)

    model = teacher.model
    with torch.no_grad():
        x = model.patch_embed(normalise(images))  # [B, h, w, D]
        x, rope = model._pos_embed(x)  # [B, 5 + P, D] with CLS and registers prepended
        x = model.blocks[0](x, rope=rope)
        expected = model.norm(x)[:, NUM_PREFIX_TOKENS:]

    assert len(output.patch_levels) == 2
    torch.testing.assert_close(output.patch_levels[0], expected, atol=1e-5, rtol=0)
    assert output.patch_levels[-1] is output.patch
    assert (output.patch_levels[0] - output.patch_levels[1]).abs().max() > 1e-2


def test_output_types_and_dtype(teacher):
    output = teacher(random_images(3, 32, 32))
    assert isinstance(output, TeacherOutput)
    assert output.cls.dtype == torch.float32
    assert output.cls.shape == (3, TINY_KWARGS["embed_dim"])
    assert all(level.dtype == torch.float32 for level in output.patch_levels)


def test_blocks_resolved_and_checked():
    model = make_tiny_model("vit_small_patch16_dinov3")
    assert DinoV3Teacher(model, blocks=(-1,)).blocks == (1,)
    assert DinoV3Teacher(model, blocks=(1, 0)).blocks == (0, 1)
    assert DinoV3Teacher(model).num_blocks == 2

    with pytest.raises(ValueError, match="out of range"):
        DinoV3Teacher(model, blocks=(2,))
    with pytest.raises(ValueError, match="same block twice"):
        DinoV3Teacher(model, blocks=(1, -1))
    with pytest.raises(ValueError, match="non-empty"):
        DinoV3Teacher(model, blocks=())


def test_attributes_follow_contract(teacher):
    assert teacher.embed_dim == TINY_KWARGS["embed_dim"]
    assert teacher.patch_size == 16
    assert teacher.num_blocks == TINY_KWARGS["depth"]
    assert teacher.blocks == (0, 1)


class Parent(nn.Module):
    """A model that owns a teacher and a trainable layer, as the full DinoRankCLIP model does."""

    def __init__(self, teacher: DinoV3Teacher):
        super().__init__()
        self.teacher = teacher
        self.head = nn.Linear(TINY_KWARGS["embed_dim"], 4)


def test_train_mode_parent_keeps_teacher_deterministic():
    # Drop path and RoPE coordinate jitter make this model random in train mode.
    kwargs = {"drop_path_rate": 0.5, "rope_shift_coords": 0.5, "rope_jitter_coords": 2.0}
    images = random_images(2, 64, 64)
    raw = make_tiny_model("vit_small_patch16_dinov3", seed=4, **kwargs).train()
    with torch.no_grad():
        raw_first = raw.forward_features(normalise(images))
        raw_second = raw.forward_features(normalise(images))
    assert not torch.equal(raw_first, raw_second), "the model must be random in train mode for this test to mean much"

    parent = Parent(DinoV3Teacher(make_tiny_model("vit_small_patch16_dinov3", seed=4, **kwargs)))
    parent.train()

    assert parent.training and parent.head.training
    assert not any(module.training for module in parent.teacher.modules())
    first = parent.teacher(images)
    second = parent.teacher(images)
    assert torch.equal(first.cls, second.cls)
    assert torch.equal(first.patch, second.patch)


def test_teacher_gets_no_gradient():
    teacher = DinoV3Teacher(make_tiny_model("vit_small_patch16_dinov3_qkvb", seed=1))
    parent = Parent(teacher)
    assert not any(param.requires_grad for param in teacher.parameters())

    images = random_images(2, 32, 32).requires_grad_(True)
    output = teacher(images)
    assert not output.cls.requires_grad
    assert not output.patch.requires_grad

    # The outputs serve as loss targets: autograd must accept them next to trainable tensors.
    loss = F.mse_loss(parent.head(output.cls), torch.zeros(2, 4)) + (parent.head.weight.sum() * output.patch).mean()
    loss.backward()
    assert parent.head.weight.grad is not None
    assert all(param.grad is None for param in teacher.parameters())
    assert images.grad is None


def test_normalisation_constants_not_in_state_dict(teacher):
    keys = teacher.state_dict().keys()
    assert "mean" not in keys
    assert "std" not in keys
    assert all(key.startswith("model.") for key in keys)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((224, 224), (224, 224)),
        ((256, 256), (256, 256)),
        ((320, 224), (320, 224)),
        ((230, 230), (224, 224)),
        ((232, 248), (240, 256)),  # exact halves round up
        ((231, 247), (224, 240)),
        ((7, 5), (16, 16)),  # at least one patch per side
    ],
)
def test_input_size_rule(size, expected):
    assert teacher_input_size(*size, 16) == expected


def test_input_size_rule_rejects_bad_values():
    with pytest.raises(ValueError, match="patch_size"):
        teacher_input_size(224, 224, 0)
    with pytest.raises(ValueError, match="h must be a positive int"):
        teacher_input_size(224.0, 224, 16)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((224, 224), (14, 14)), ((256, 256), (16, 16)), ((320, 224), (20, 14)), ((230, 230), (14, 14))],
)
def test_teacher_grid_follows_size_rule(teacher, size, grid):
    output = teacher(random_images(1, *size))
    assert output.grid_size == grid
    assert output.patch.shape == (1, grid[0] * grid[1], TINY_KWARGS["embed_dim"])


def test_non_multiple_input_is_resized(teacher):
    """A 230x230 image gives the features of the same image resized (bilinear, antialiased) to 224x224."""
    images = random_images(2, 230, 230)
    resized = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)

    actual = teacher(images)
    expected = teacher(resized)
    torch.testing.assert_close(actual.cls, expected.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.patch, expected.patch, atol=1e-6, rtol=0)


def test_multiple_of_patch_is_not_resized(teacher):
    """Inputs whose sides are multiples of the patch size reach the model unchanged."""
    images = random_images(1, 320, 224)
    tokens = teacher.model.forward_features(normalise(images))
    torch.testing.assert_close(teacher(images).patch, tokens[:, NUM_PREFIX_TOKENS:], atol=1e-5, rtol=0)


def test_bad_inputs_rejected(teacher):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        teacher(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float images"):
        teacher(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_on_cuda():
    teacher = DinoV3Teacher(make_tiny_model("vit_small_patch16_dinov3"), blocks=(0, -1)).cuda()
    images = random_images(2, 64, 64).cuda()

    teacher.autocast_bf16 = False
    full = teacher(images)
    teacher.autocast_bf16 = True
    mixed = teacher(images)

    assert mixed.patch.dtype == torch.float32
    assert not torch.equal(mixed.patch, full.patch), "bf16 autocast did not change the computation"
    similarity = F.cosine_similarity(mixed.patch.flatten(0, 1), full.patch.flatten(0, 1), dim=-1)
    assert similarity.min() > 0.99
