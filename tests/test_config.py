"""Config schema: presets, dotted overrides and the errors for bad keys and values."""

from __future__ import annotations

import pytest

from dinorankclip.config import Config, ConfigError, config_from_dict, list_presets, load_config


def test_presets_load():
    assert {"tiny-cpu", "rn50-cc3m"} <= set(list_presets())
    tiny = load_config("tiny-cpu")
    assert tiny.model.trunk == "dinorankclip-tiny"
    assert tiny.loss.order == 3
    paper = load_config("rn50-cc3m")
    assert paper.model.trunk == "RN50"
    assert paper.teacher.name == "vit_base_patch16_dinov3"


def test_overrides_typed():
    cfg = load_config("tiny-cpu", ["loss.order=2", "train.lr=1e-3", "teacher.blocks=[1, 3]", "train.grad_clip=null",
                                   "data.augment=false", "eval.zeroshot.cifar10=a.csv", "teacher.model_kwargs.depth=2"])
    assert cfg.loss.order == 2
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.teacher.blocks == [1, 3]
    assert cfg.train.grad_clip is None
    assert cfg.data.augment is False
    assert cfg.eval.zeroshot == {"cifar10": "a.csv"}
    assert cfg.teacher.model_kwargs == {"depth": 2}


def test_order_defaults_per_method():
    assert load_config(None, ["loss.name=clip"]).loss.order == 0
    assert load_config(None, ["loss.name=rankclip"]).loss.order == 1
    assert load_config(None, ["loss.name=dinorankclip"]).loss.order == 3


@pytest.mark.parametrize(("name", "order"), [("clip", 0), ("cyclip", 0), ("alip", 0), ("rankclip", 1)])
def test_baseline_name_replaces_file_order(name, order):
    cfg = load_config("tiny-cpu", [f"loss.name={name}"])  # the preset sets loss.order: 3
    assert cfg.loss.order == order


def test_dinorankclip_keeps_file_order(tmp_path):
    path = tmp_path / "order2.yaml"
    path.write_text("loss:\n  name: clip\n  order: 0\n")
    assert load_config(path, ["loss.name=dinorankclip"]).loss.order == 0
    assert load_config("tiny-cpu", ["loss.name=dinorankclip"]).loss.order == 3


def test_file_order_conflict_still_raises(tmp_path):
    path = tmp_path / "conflict.yaml"
    path.write_text("loss:\n  name: rankclip\n  order: 3\n")
    with pytest.raises(ConfigError, match="loss.name=dinorankclip to choose the order"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("loss.ordr=3", "loss.ordr"),
        ("lossx.order=3", "lossx"),
        ("loss.order=9", "loss.order=9"),
        ("fusion.variant=full_gate", "no_pyramid"),
        ("train.lr=fast", "train.lr='fast'"),
        ("train.batch_size=0", "train.batch_size=0"),
        ("loss.name=rankclip loss.order=3", None),
        ("train.precision=fp8", "bf16"),
        ("teacher.blocks=[1,2", "teacher.blocks=[1,2 is not valid YAML"),
        ("train.batch_size=1", "at least 2 pairs"),
        ("train.lr=.inf", "expected a finite number"),
        ("train.weight_decay=.nan", "train.weight_decay=nan is invalid"),
        ("loss.rank_weight=.nan", "expected a finite number"),
        ("train.grad_clip=-.inf", "train.grad_clip"),
        ("model.init_logit_scale=.nan", "model.init_logit_scale"),
        ("train.time_budget_minutes=.nan", "train.time_budget_minutes"),
        ("model.context_length=2", "at least 3"),
        ("data.separator=ab", "data.separator='ab'"),
    ],
)
def test_bad_override_names_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", override.split())
    if fragment is not None:
        assert fragment in str(err.value)


def test_rankclip_order_conflict_message():
    with pytest.raises(ConfigError, match="loss.name=dinorankclip to choose the order"):
        load_config(None, ["loss.name=rankclip", "loss.order=3"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(path)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["loss.order"])


def test_missing_config_file_lists_presets():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-preset")


def test_roundtrip_through_dict():
    cfg = load_config("tiny-cpu", ["loss.top_k=16"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again, Config)
