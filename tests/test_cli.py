"""Command line end to end on real images: train two steps, evaluate, and the errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from dinorankclip.cli.main import main
from dinorankclip.config import load_config
from dinorankclip.train.distributed import resolve_device


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory, sample_data):
    """16 real Flickr8k pairs (4 images x 4 captions) in a folder of their own."""
    root = tmp_path_factory.mktemp("pairs")
    lines = (sample_data / "flickr8k" / "train.csv").read_text().splitlines()
    rows = lines[1:17]
    for row in rows:
        rel = row.split(",")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_data / "flickr8k" / rel, root / rel)
    (root / "pairs.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pairs_csv, tiny_overrides):
    run = tmp_path_factory.mktemp("run")
    code = main(["train", "--config", "tiny-cpu", "--out", str(run), *tiny_overrides, f"data.train={pairs_csv}"])
    assert code == 0
    return run


def test_train_writes_run_folder(trained_run):
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "training_state.json"):
        assert (trained_run / name).is_file(), name
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "clip", "rank_cross", "rank_in", "gram", "relational", "text_align", "gate_l1", "lr",
                "logit_scale", "gate_mean", "samples_per_second"):
        assert key in records[-1], key
    state = json.loads((trained_run / "training_state.json").read_text())
    assert state["steps"] == 2
    saved = load_config(trained_run / "config.yaml")
    assert saved.loss.order == 3 and saved.train.steps == 2


def test_checkpoint_has_no_teacher_tensor(trained_run):
    with safe_open(str(trained_run / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys, "empty checkpoint"
    assert not [k for k in keys if "teacher" in k]
    assert any(k.startswith("student_image.") for k in keys)


def test_eval_on_checkpoint(trained_run, sample_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(["eval", "--checkpoint", str(trained_run), "--workers", "0",
                 "--zeroshot", f"svhn={sample_data / 'svhn' / 'labels.csv'}",
                 "--retrieval", str(sample_data / "flickr8k" / "test.csv"), "--out", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    tasks = {r["task"]: r for r in records}
    assert tasks["zeroshot_classification"]["dataset"] == "svhn"
    assert tasks["zeroshot_classification"]["metrics"]["num_images"] == 4
    assert tasks["zeroshot_retrieval"]["metrics"]["num_texts"] == 625
    assert json.loads(capsys.readouterr().out) == records


def test_unknown_config_key_exits_with_message(capsys):
    assert main(["train", "--config", "tiny-cpu", "loss.oder=3"]) == 2
    assert "unknown config key 'loss.oder'" in capsys.readouterr().err


def test_missing_teacher_weights_file(pairs_csv, tiny_overrides, tmp_path, capsys):
    missing = tmp_path / "dinov3_vits16.pth"
    code = main(["train", "--config", "tiny-cpu", "--out", str(tmp_path / "run"), *tiny_overrides,
                 f"data.train={pairs_csv}", f"teacher.weights={missing}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "Hugging Face" in err  # the accepted formats are listed


def test_missing_caption_column(pairs_csv, tiny_overrides, tmp_path, capsys):
    code = main(["train", "--config", "tiny-cpu", "--out", str(tmp_path / "run"), *tiny_overrides,
                 f"data.train={pairs_csv}", "data.caption_column=text"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'text' is missing" in err and "data.caption_column" in err


def test_teacher_gets_no_gradient_and_stays_fixed(pairs_csv, tiny_overrides, tmp_path):
    from dinorankclip.data.csv_dataset import CaptionDataset, collate_samples
    from dinorankclip.data.transforms import PairedViews
    from dinorankclip.losses import Objective
    from dinorankclip.models.dinorankclip import build_model
    from dinorankclip.models.trunk import build_tokenizer
    from dinorankclip.train.distributed import DistributedContext
    from dinorankclip.train.optim import build_optimizer
    from dinorankclip.train.step import StepRunner, TrainForward
    from dinorankclip.train.teacher_source import build_teacher_source

    cfg = load_config("tiny-cpu", [*tiny_overrides, f"data.train={pairs_csv}", "train.steps=3"])
    teacher, geometry = build_teacher_source(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in teacher.teacher.state_dict().items()}
    model = build_model(cfg, geometry)
    objective = Objective(cfg.loss, model.spec.embed_dim)
    views = PairedViews(model.spec.image_size, model.spec.image_mean, model.spec.image_std,
                        teacher_size=geometry.image_size, train=True)
    data = CaptionDataset(pairs_csv, transform=views, tokenizer=build_tokenizer(model.spec))
    batch = collate_samples([data[i] for i in range(8)])
    optimizer = build_optimizer([("model", model), ("objective", objective)], lr=1e-2, weight_decay=0.1,
                                betas=(0.9, 0.98), eps=1e-6)
    runner = StepRunner(model=model, forward=TrainForward(model), objective=objective, teacher=teacher,
                        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                        ctx=DistributedContext(), image_mean=model.spec.image_mean, image_std=model.spec.image_std)
    student_before = model.student_image.proj[0].weight.detach().clone()
    for step in range(3):
        assert runner.forward_backward(batch, progress=step / 3, on_loss=lambda terms: True) is not None
        assert runner.apply(lr=1e-2)[1]
    assert all(p.grad is None for p in teacher.teacher.parameters())
    for key, value in teacher.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not teacher.teacher.training
    assert not torch.equal(model.student_image.proj[0].weight, student_before)  # the student did learn


def test_train_refuses_existing_run_folder(trained_run, pairs_csv, tiny_overrides, capsys):
    model = (trained_run / "model.safetensors").read_bytes()
    metrics = (trained_run / "metrics.jsonl").read_text()
    code = main(["train", "--config", "tiny-cpu", "--out", str(trained_run), *tiny_overrides,
                 f"data.train={pairs_csv}", "train.lr=0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "already contains a run" in err
    assert "train.overwrite=true" in err
    assert (trained_run / "model.safetensors").read_bytes() == model
    assert (trained_run / "metrics.jsonl").read_text() == metrics
    assert load_config(trained_run / "config.yaml").train.lr != 0.5


def test_train_overwrite_starts_afresh(tmp_path, trained_run, pairs_csv, tiny_overrides):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    code = main(["train", "--config", "tiny-cpu", "--out", str(run), *tiny_overrides, f"data.train={pairs_csv}",
                 "train.overwrite=true"])
    assert code == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_run_files_share_one_mode(trained_run):
    expected = (trained_run / "config.yaml").stat().st_mode & 0o777
    for name in ("model.safetensors", "training_state.json", "metrics.jsonl"):
        assert (trained_run / name).stat().st_mode & 0o777 == expected, name


def test_eval_on_non_safetensors_file(tmp_path, capsys):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a safetensors header")
    assert main(["eval", "--checkpoint", str(bogus), "--bundled-eval"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "option", "fragment"), [
    ("tpu", "train.device=", "train.device=tpu is invalid; use auto, cpu, cuda or cuda:N"),
    ("gpu0", "--device", "--device gpu0 is invalid"),
])
def test_unknown_device_names_option(name, option, fragment):
    with pytest.raises(ValueError) as err:
        resolve_device(name, option=option)
    assert fragment in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_names_option():
    with pytest.raises(ValueError, match="train.device=cuda is invalid: CUDA is not available; use train.device=cpu"):
        resolve_device("cuda")


def test_overrides_around_options(capsys):
    assert main(["config", "train.steps=7", "--config", "tiny-cpu", "loss.order=2", "train.steps=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 9  # the later override wins
    assert printed["loss"]["order"] == 2


def test_unknown_option_still_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "loss.order=2", "--config", "tiny-cpu", "--bogus", "train.steps=3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
