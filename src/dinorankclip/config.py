"""Typed run configuration: the only schema for models, losses, data, training and evaluation.

A run is described by one :class:`Config`. It is built from a YAML preset (``configs/*.yaml``) and
dotted command-line overrides such as ``loss.order=3`` or ``train.lr=1e-3``. Every section is a
dataclass validated in ``__post_init__``; unknown keys and invalid values raise :class:`ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FusionConfig",
    "LossConfig",
    "ModelConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "load_config",
    "preset_path",
    "list_presets",
]

LOSS_NAMES = ("clip", "cyclip", "alip", "rankclip", "dinorankclip")
# Ranking order fixed by each baseline; dinorankclip takes any order 0..4 and defaults to 3.
FIXED_ORDER = {"clip": 0, "cyclip": 0, "alip": 0, "rankclip": 1}
FUSION_VARIANTS = ("full", "no_pyramid", "no_channel_spatial", "image_only", "no_refiner", "no_gate", "none")
PRESETS_DIR = Path(__file__).resolve().parent / "configs"

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid configuration key or value."""


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed values: {', '.join(map(str, allowed))}")


def _check_positive(key: str, value: float | int | None, *, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a number"
        raise ConfigError(f"{key}={value!r} is invalid; it must be {kind} {bound}")


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value!r} is invalid; it must lie in [0, 1]")


@dataclass
class ModelConfig:
    """CLIP trunk: an open_clip architecture trained from scratch unless ``pretrained`` is set."""

    trunk: str = "tiny"  # open_clip model name (RN50, ViT-B-32, ViT-B-16, ...) or a bundled config ("tiny")
    pretrained: str | None = None  # local open_clip checkpoint file; never downloaded
    image_size: int | None = None  # trunk input size in pixels; None keeps the architecture's own
    context_length: int | None = None  # text tokens; None keeps the architecture's own
    init_logit_scale: float = 1 / 0.07  # initial logit scale s (temperature 0.07)
    max_logit_scale: float = 100.0  # s is clamped to at most this value
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_positive("model.image_size", self.image_size, allow_none=True)
        _check_positive("model.context_length", self.context_length, allow_none=True)
        if self.context_length is not None and self.context_length < 3:
            raise ConfigError(
                f"model.context_length={self.context_length!r} is invalid; it must be at least 3 (the start token, "
                "one caption token and the end token)"
            )
        _check_positive("model.init_logit_scale", self.init_logit_scale)
        if self.max_logit_scale < self.init_logit_scale:
            raise ConfigError(
                f"model.max_logit_scale={self.max_logit_scale!r} is below model.init_logit_scale="
                f"{self.init_logit_scale!r}; raise the maximum or lower the initial value"
            )


@dataclass
class TeacherConfig:
    """Frozen DINOv3 teacher (timm architecture, weights from a local file)."""

    name: str = "vit_base_patch16_dinov3"  # timm architecture name
    weights: str | None = None  # Meta .pth, timm .safetensors/.pth, Hugging Face folder, or "random" (tests)
    image_size: int = 224  # input size of the teacher and the student image branch, in pixels
    blocks: list[int] = field(default_factory=lambda: [-4, -1])  # blocks whose patch tokens are used
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (e.g. depth for tiny tests)
    cache: str | None = None  # teacher feature cache folder; when set the teacher is never built
    # With a cache, keep data.augment's random crops. Off by default: cached features belong to the centre crop,
    # so random crops would pair the student's view with targets of another crop.
    cache_augment: bool = False
    autocast: bool = True  # bf16 autocast for the teacher on CUDA

    def __post_init__(self) -> None:
        _check_positive("teacher.image_size", self.image_size)
        if not self.blocks:
            raise ConfigError("teacher.blocks=[] is invalid; give at least one block index, e.g. [-1]")


@dataclass
class StudentConfig:
    """Dual-branch student: a small timm ViT image branch and a text projection into teacher space."""

    name: str = "vit_tiny_patch16_224"  # timm architecture of the image branch
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (e.g. depth)
    blocks: list[int] | None = None  # student blocks paired with teacher.blocks; None spreads them evenly

    def __post_init__(self) -> None:
        if self.blocks is not None and not self.blocks:
            raise ConfigError("student.blocks=[] is invalid; use null to pair blocks automatically")


@dataclass
class FusionConfig:
    """Multi-scale fusion with channel-spatial attention, a refiner and the conflict-aware gate."""

    variant: Literal["full", "no_pyramid", "no_channel_spatial", "image_only", "no_refiner", "no_gate", "none"] = (
        "full"
    )
    injection_source: Literal["student", "teacher"] = "student"
    width: int = 256  # token width inside the fusion module
    pyramid_levels: list[int] = field(default_factory=lambda: [1, 2, 4])
    refiner_depth: int = 1
    refiner_heads: int = 4
    gate_hidden: int = 256

    def __post_init__(self) -> None:
        _check_choice("fusion.variant", self.variant, FUSION_VARIANTS)
        _check_choice("fusion.injection_source", self.injection_source, ("student", "teacher"))
        _check_positive("fusion.width", self.width)
        _check_positive("fusion.refiner_depth", self.refiner_depth)
        _check_positive("fusion.refiner_heads", self.refiner_heads)
        _check_positive("fusion.gate_hidden", self.gate_hidden)
        if self.width % self.refiner_heads:
            raise ConfigError(
                f"fusion.width={self.width} is not divisible by fusion.refiner_heads={self.refiner_heads}"
            )
        if not self.pyramid_levels or any(level < 1 for level in self.pyramid_levels):
            raise ConfigError(f"fusion.pyramid_levels={self.pyramid_levels!r} is invalid; use positive sizes")

    @property
    def enabled(self) -> bool:
        return self.variant != "none"


@dataclass
class LossConfig:
    """Training objective. ``name`` picks the method, ``order`` the Plackett-Luce order R."""

    name: Literal["clip", "cyclip", "alip", "rankclip", "dinorankclip"] = "dinorankclip"
    order: int | None = None  # R; None means the method's own: clip/cyclip/alip 0, rankclip 1, dinorankclip 3
    rank_weight: float = 0.125  # lambda_rank, reached after the ramp (RankCLIP's weight in per-position units)
    rank_warmup_fraction: float = 2 / 3  # fraction of training over which the ranking weight ramps up from 0
    top_k: int | None = None  # model only the first K positions of each target ranking
    transition_heads: int = 1
    transition_head_dim: int = 32
    transition_detach: bool = False  # stop gradients into the transition heads' inputs
    gram_weight: float = 1.0
    relational_weight: float = 1.0
    text_align_weight: float = 1.0
    gate_l1_weight: float = 0.01
    cyclip_in_modal: float = 0.25
    cyclip_cross_modal: float = 0.25
    alip_ema: float = 0.99

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, LOSS_NAMES)
        fixed = FIXED_ORDER
        if self.order is None:
            self.order = fixed.get(self.name, 3)
        if not 0 <= self.order <= 4:
            raise ConfigError(f"loss.order={self.order!r} is invalid; allowed values: 0, 1, 2, 3, 4")
        if self.name in fixed and self.order != fixed[self.name]:
            raise ConfigError(
                f"loss.order={self.order} does not match loss.name={self.name!r}, which fixes order "
                f"{fixed[self.name]}; use loss.name=dinorankclip to choose the order"
            )
        _check_positive("loss.top_k", self.top_k, allow_none=True)
        _check_positive("loss.transition_heads", self.transition_heads)
        _check_positive("loss.transition_head_dim", self.transition_head_dim)
        _check_fraction("loss.rank_warmup_fraction", self.rank_warmup_fraction)
        _check_fraction("loss.alip_ema", self.alip_ema)
        for name in ("rank_weight", "gram_weight", "relational_weight", "text_align_weight", "gate_l1_weight",
                     "cyclip_in_modal", "cyclip_cross_modal"):
            _check_positive(f"loss.{name}", getattr(self, name), allow_zero=True)


@dataclass
class DataConfig:
    """Training data: a CSV/TSV of image paths and captions, or WebDataset shards (img2dataset layout)."""

    train: str | None = None  # CSV/TSV file, or shards such as "data/shard-{000000..000099}.tar" ("::" joins lists)
    val: str | None = None  # optional held-out CSV/TSV for retrieval during training
    format: Literal["auto", "csv", "webdataset"] = "auto"  # auto: webdataset when data.train names .tar files
    filepath_column: str = "filepath"
    caption_column: str = "caption"
    second_caption_column: str | None = None  # second caption per image (ALIP)
    separator: str | None = None  # None: tab for .tsv files, comma otherwise
    num_workers: int = 2  # DataLoader worker processes per training process
    max_bad_fraction: float = 0.05  # stop when more than this fraction of samples cannot be read
    exif_transpose: bool = True  # apply EXIF orientation before any crop (training, evaluation, teacher)
    augment: bool = True  # random resized crop in training (scale 0.9-1.0, as open_clip)
    decode_draft: bool = True  # decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the crop
    # WebDataset shards
    num_samples: int | None = None  # samples per epoch; None: the sum of sizes.json next to the shards
    resampled: bool = False  # draw shards with replacement instead of one pass per epoch
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer; 0 keeps the order inside shards
    image_key: str = "jpg;png;webp;jpeg"  # image member extensions, first match wins
    caption_key: str = "txt"  # caption member extension, or "json:FIELD" for a field of the sample's .json
    second_caption_key: str | None = None  # second caption in shards (ALIP), same syntax as caption_key

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, ("auto", "csv", "webdataset"))
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        _check_fraction("data.max_bad_fraction", self.max_bad_fraction)
        _check_positive("data.num_samples", self.num_samples, allow_none=True)
        _check_positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        if self.separator is not None and self.separator not in ("\\t", "tab") and len(self.separator) != 1:
            raise ConfigError(
                f"data.separator={self.separator!r} is invalid; give one character, or 'tab' (or '\\t') for tabs"
            )
        if not [ext for ext in self.image_key.split(";") if ext.strip()]:
            raise ConfigError(f"data.image_key={self.image_key!r} is invalid; give extensions such as 'jpg;png'")
        for name in ("caption_key", "second_caption_key"):
            value = getattr(self, name)
            if value is None and name == "second_caption_key":
                continue
            if not value or value.strip() in ("", "json:"):
                raise ConfigError(
                    f"data.{name}={value!r} is invalid; give a member extension such as 'txt' or "
                    "'json:FIELD' for a field of the sample's .json member"
                )

    @property
    def is_webdataset(self) -> bool:
        """Whether ``train`` names WebDataset shards (``format``, or .tar files when ``format`` is auto)."""
        if self.format != "auto":
            return self.format == "webdataset"
        return self.train is not None and any(
            part.strip().endswith((".tar", ".tar}", ".tgz", ".tar.gz")) for part in self.train.split("::")
        )


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and logging."""

    output_dir: str = "runs/default"
    steps: int = 1000  # optimiser steps in the schedule
    time_budget_minutes: float | None = None  # fit the schedule to this wall-clock budget (measured)
    batch_size: int = 128  # global batch size (pairs per step)
    lr: float = 5e-4
    weight_decay: float = 0.1  # applied to weight matrices only, never to norms, biases or the logit scale
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    seed: int = 0
    log_every: int = 10  # steps between metric records
    checkpoint_every: int = 0  # steps between resumable checkpoints (plus one at the end); 0 writes none
    tensorboard: bool = True
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    grad_accum_steps: int = 1  # micro-batches per step; the contrastive batch stays train.batch_size
    compile: bool = False  # torch.compile the model
    resume: str | None = None  # "latest" (newest checkpoint of output_dir, if any) or a checkpoint folder
    overwrite: bool = False  # start afresh in an output_dir that contains an earlier run, deleting its results
    keep_checkpoints: int = 2  # resumable checkpoints kept in output_dir/checkpoints; 0 keeps all

    def __post_init__(self) -> None:
        _check_positive("train.steps", self.steps)
        _check_positive("train.time_budget_minutes", self.time_budget_minutes, allow_none=True)
        _check_positive("train.batch_size", self.batch_size)
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size={self.batch_size} is invalid; contrastive and ranking losses need "
                              "at least 2 pairs per batch")
        _check_positive("train.lr", self.lr)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_fraction("train.min_lr_ratio", self.min_lr_ratio)
        _check_positive("train.grad_clip", self.grad_clip, allow_none=True)
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_positive("train.log_every", self.log_every)
        _check_positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _check_positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        _check_positive("train.grad_accum_steps", self.grad_accum_steps)
        _check_positive("train.keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum_steps="
                f"{self.grad_accum_steps}; every micro-batch must have the same size"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas!r} is invalid; give two values in [0, 1)")


@dataclass
class EvalConfig:
    """Evaluation tasks run after training or by ``dinorankclip eval``.

    A dataset source is a labels CSV/TSV (``filepath,label`` with ``classnames.txt`` beside it) or a dataset
    root folder in its standard layout (torchvision, ImageNet-style image folders, CUB-200-2011,
    CLIP_benchmark WebDataset); see ``dinorankclip.eval.datasets``.
    """

    batch_size: int = 256
    zeroshot: dict[str, str] = field(default_factory=dict)  # dataset name -> labels CSV or dataset root
    zeroshot_split: str = "test"  # split read from dataset folders and from CSVs with a split column
    retrieval: str | None = None  # caption CSV (several captions per image allowed) or Karpathy-split JSON
    retrieval_split: str = "test"  # split of a Karpathy JSON
    retrieval_image_root: str | None = None  # image folder of a Karpathy JSON; None: the JSON's folder
    templates: str | None = None  # user template file (one template per line with "{c}")
    prompts: str | None = None  # prompts.json with class names and templates; None uses the bundled copy
    probe: dict[str, str] = field(default_factory=dict)  # dataset name -> labels CSV, root, or "TRAIN,TEST"
    probe_c_values: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0])
    probe_val_fraction: float = 0.2  # share of each class's training images used to pick C
    probe_test_fraction: float = 0.5  # share of each class held out as test data when a dataset has no split
    probe_max_iter: int = 1000  # L-BFGS iterations of the logistic regression
    probe_features: Literal["image_features", "clip_image_features"] = "image_features"  # fused or trunk
    modality_gap: str | None = None  # held-out caption CSV or Karpathy JSON for the four-node modality gap
    modality_gap_max_pairs: int | None = 1000  # first N held-out images (one caption each); null: all
    max_bad_fraction: float = 0.05  # a task fails when more than this fraction of its images cannot be read

    def __post_init__(self) -> None:
        _check_positive("eval.batch_size", self.batch_size)
        if not self.probe_c_values or any(c <= 0 for c in self.probe_c_values):
            raise ConfigError(f"eval.probe_c_values={self.probe_c_values!r} is invalid; give positive numbers")
        for name in ("probe_val_fraction", "probe_test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"eval.{name}={value!r} is invalid; it must lie in (0, 1)")
        _check_positive("eval.probe_max_iter", self.probe_max_iter)
        _check_choice("eval.probe_features", self.probe_features, ("image_features", "clip_image_features"))
        _check_positive("eval.modality_gap_max_pairs", self.modality_gap_max_pairs, allow_none=True)
        _check_fraction("eval.max_bad_fraction", self.max_bad_fraction)


@dataclass
class Config:
    """A whole run: every section plus a free-form name."""

    name: str = "dinorankclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.fusion.injection_source == "teacher" and self.teacher.cache is None and self.teacher.weights is None:
            raise ConfigError(
                "fusion.injection_source='teacher' needs teacher.weights (a local file) or teacher.cache"
            )

    @property
    def needs_teacher(self) -> bool:
        """Whether training uses teacher features (distillation or direct injection)."""
        return self.fusion.enabled

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# ---------------------------------------------------------------------------------------------------------------------
# Building a Config from nested dictionaries, YAML files and dotted overrides


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in options):
            if type(None) in options:
                return None
            raise ConfigError(f"{key}=None is invalid; expected {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} is invalid; expected {tp}")
    if origin is Literal:
        _check_choice(key, value, get_args(tp))
        return value
    if origin is list:
        (item_type,) = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid; expected a list such as [1, 2]")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid; expected a mapping such as {{depth: 2}}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is invalid; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid; expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is invalid; expected a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} is invalid; expected a finite number")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is invalid; expected a string")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a nested mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
            f"allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, raw: str) -> None:
    """Apply ``key=raw`` to a nested mapping; the value is parsed as YAML scalar text."""
    parts = key.split(".")
    node = tree
    cls: Any = Config
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if dataclasses.is_dataclass(cls) and part not in hints:
            prefix = ".".join(parts[:depth])
            raise ConfigError(
                f"unknown config key {key!r}; allowed keys{' in ' + repr(prefix) if prefix else ''}: "
                f"{', '.join(sorted(hints))}"
            )
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as err:
                problem = getattr(err, "problem", None) or "invalid YAML"
                raise ConfigError(
                    f"override {key}={raw} is not valid YAML ({problem}); quote strings and close brackets, "
                    f"e.g. {key}=[1, 2]"
                ) from None
            if isinstance(node[part], str) or node[part] is None:
                node[part] = raw if raw.lower() not in ("null", "~") else None
            return
        cls = hints.get(part) if dataclasses.is_dataclass(cls) else None
        if cls is None or not dataclasses.is_dataclass(cls):
            # dict-valued fields accept dotted keys: eval.zeroshot.cifar10=path
            node = node.setdefault(part, {})
            cls = dict
            continue
        node = node.setdefault(part, {})


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``tiny-cpu``) or a YAML path to an existing file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"config {str(name_or_path)!r} was not found; give a YAML file or one of the presets: "
        f"{', '.join(list_presets())}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and dotted ``key=value`` overrides.

    Args:
        path: a YAML file or a preset name; None starts from the dataclass defaults.
        overrides: strings such as ``"loss.order=3"``; the value is parsed as YAML (``null``, ``[1, 2]``).

    Raises:
        ConfigError: an unknown key, a malformed override or an invalid value, naming the key.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        file = preset_path(path)
        try:
            tree = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {file} must contain a mapping at the top level")
    keys = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is malformed; write it as key=value, e.g. loss.order=3")
        key, raw = item.split("=", 1)
        keys.add(key.strip())
        _set_dotted(tree, key.strip(), raw.strip())
    _drop_file_order(tree, keys)
    return _build(Config, tree, "")


def _drop_file_order(tree: dict[str, Any], override_keys: set[str]) -> None:
    """Let ``loss.name=clip`` on the command line replace a file's DinoRankCLIP order.

    The baselines fix their order (CLIP, CyCLIP and ALIP 0, RankCLIP 1). When an override picks one of
    them and no override sets ``loss.order``, the order from the file is dropped, so the method's own
    order applies instead of a mismatch error.
    """
    loss = tree.get("loss")
    if "loss.name" not in override_keys or "loss.order" in override_keys or not isinstance(loss, dict):
        return
    if loss.get("name") in FIXED_ORDER and loss.get("order") is not None:
        log.info("loss.name=%s fixes the ranking order; ignoring loss.order=%s from the config file",
                 loss["name"], loss["order"])
        loss["order"] = None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` saved with :meth:`Config.to_dict` (e.g. from a run folder)."""
    return _build(Config, data, "")
