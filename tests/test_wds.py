"""WebDataset shards: packing, shard plans, bad members, caption keys and a training run on a bad shard."""

from __future__ import annotations

import json
import logging
import random
import tarfile

import pytest
import torch
from train_helpers import BAD_MEMBERS, one_thread, write_bad_shard, write_good_shard, write_tar  # noqa: F401

from dinorankclip.cli.main import main as cli_main
from dinorankclip.config import DataConfig, load_config
from dinorankclip.data.loader import build_train_data
from dinorankclip.data.pack import pack_shards
from dinorankclip.data.shards import CaptionSpec, ShardPlan, ShardReader, expand_shards, shard_sizes
from dinorankclip.data.transforms import PairedViews
from dinorankclip.data.wds import SampleDecoder

VIEWS = PairedViews(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, teacher_size=32, train=True, output_uint8=True)


def _tokenizer(texts):
    return torch.tensor([[len(t), 1] for t in texts])


def _one_pass(shard, caption="txt"):
    """Read one shard once; returns (good keys, bad samples) in stream order."""
    spec = CaptionSpec.parse(caption)
    plan = ShardPlan([str(shard)], seed=0, num_workers=1)
    reader = ShardReader(plan, 0, spec)
    decoder = SampleDecoder(VIEWS, _tokenizer, image_keys=("jpg",), caption=spec)
    good, bad = [], []
    for item in reader._read(str(shard), 0, skip=0):
        sample = decoder(item) if not hasattr(item, "kind") else item
        (bad if hasattr(sample, "kind") else good).append(sample)
    return [s["key"] for s in good], bad


def test_pack_writes_shards_and_sizes(tmp_path, sample_data):
    table = tmp_path / "pairs.csv"
    rows = ["images/" + p.name for p in sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[:7]]
    (tmp_path / "images").symlink_to(sample_data / "flickr8k" / "images")
    table.write_text("filepath,caption\n" + "".join(f"{r},caption of {r}\n" for r in rows) + "images/nope.jpg,x\n")
    assert cli_main(["data", "pack", str(table), "--out", str(tmp_path / "shards"), "--shard-size", "3"]) == 0
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    shards = expand_shards(str(tmp_path / "shards" / "shard-{000000..000002}.tar"))
    assert shard_sizes(shards) == 7
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    keys, bad = _one_pass(shards[0])
    assert keys == ["000000000", "000000001", "000000002"]
    assert bad == []


def test_bad_members_skipped_with_kind_and_key(tmp_path):
    good_keys = write_bad_shard(tmp_path / "bad.tar")
    keys, bad = _one_pass(tmp_path / "bad.tar")
    assert keys == good_keys
    assert len(keys) == 14
    found = [(b.kind, b.key) for b in bad]
    expected = [(kind, "s013" if i == 14 else f"s{i:03d}") for i, kind in sorted(BAD_MEMBERS.items())]
    assert found == expected
    assert all(b.source == str(tmp_path / "bad.tar") for b in bad)


def test_caption_from_json_field(tmp_path):
    write_good_shard(tmp_path / "a.tar", 0, 3)
    spec = CaptionSpec.parse("json:caption")
    plan = ShardPlan([str(tmp_path / "a.tar")], seed=0, num_workers=1)
    record = next(iter(ShardReader(plan, 0, spec)))
    assert spec.read(record.members) == "json caption 0"
    assert CaptionSpec.parse("txt").read(record.members) == "a photo number 0"


def test_missing_caption_key_names_keys_found(tmp_path):
    members = []
    for i in range(5):
        members += [(f"x{i}.jpg", b"\xff\xd8\xff"), (f"x{i}.json", b'{"url": "u", "status": "ok"}')]
    write_tar(tmp_path / "nocap.tar", members)
    plan = ShardPlan([str(tmp_path / "nocap.tar")], seed=0, num_workers=1)
    with pytest.raises(ValueError) as err:
        list(ShardReader(plan, 0, CaptionSpec.parse("txt"))._read(str(tmp_path / "nocap.tar"), 0, skip=0))
    message = str(err.value)
    assert "data.caption_key='txt'" in message
    assert "jpg, json" in message
    assert "status, url" in message


def test_missing_caption_error_reaches_training(tmp_path, tiny_overrides):
    members = []
    for i in range(12):
        members += [(f"x{i:02d}.jpg", b"\xff\xd8\xff"), (f"x{i:02d}.cls", b"3")]
    for name in ("a", "b"):
        write_tar(tmp_path / f"{name}.tar", members)
    from dinorankclip.train.trainer import train

    cfg = load_config(None, list(tiny_overrides) + [
        "fusion.variant=none", f"data.train={tmp_path}/{{a,b}}.tar", "data.num_workers=2",
        f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="member extensions found: cls, jpg"):
        train(cfg)


def test_shard_plan_epochs_and_workers():
    shards = [f"s{i}.tar" for i in range(7)]
    plan = ShardPlan(shards, seed=3, num_workers=3)
    for epoch in range(2):
        seen = []
        for worker in range(3):
            per_epoch = plan.slots_per_epoch(worker)
            seen += [plan.slot(worker, epoch * per_epoch + j)[0] for j in range(per_epoch)]
        assert sorted(seen) == shards  # each epoch covers every shard once, split across workers
    order0 = [plan.slot(0, j)[0] for j in range(3)]
    assert order0 == [ShardPlan(shards, seed=3, num_workers=3).slot(0, j)[0] for j in range(3)]
    epoch0 = [plan.slot(w, 0)[0] for w in range(3)]
    epoch1 = [plan.slot(w, plan.slots_per_epoch(w))[0] for w in range(3)]
    assert epoch0 != epoch1  # reshuffled per epoch


def test_resampled_plan_draws_with_replacement():
    shards = [f"s{i}.tar" for i in range(4)]
    plan = ShardPlan(shards, seed=0, num_workers=8, resampled=True)  # more workers than shards is fine
    draws = [plan.slot(w, j)[0] for w in range(8) for j in range(4)]
    assert set(draws) == set(shards)
    assert len(draws) > len(set(draws))


def test_too_few_shards_rejected():
    with pytest.raises(ValueError, match="data.resampled=true"):
        ShardPlan(["a.tar", "b.tar"], seed=0, num_workers=4)


def test_ranks_read_disjoint_shards(tmp_path):
    for i in range(4):
        write_good_shard(tmp_path / f"s{i}.tar", 10 * i, 4)
    cfg = DataConfig(train=str(tmp_path / "s{0..3}.tar"), num_workers=0, shuffle_buffer=0)
    keys = []
    for rank in range(2):
        loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=8, seed=1, rank=rank,
                                  world_size=2)
        keys.append({k for _ in range(2) for k in next(loader)["key"]})  # 2 batches of 4 = one epoch
        loader.close()
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 16


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_continues_stream(tmp_path, num_workers):
    for i in range(4):
        write_good_shard(tmp_path / f"s{i}.tar", 10 * i, 9)
    cfg = DataConfig(train=str(tmp_path / "s{0..3}.tar"), num_workers=num_workers, shuffle_buffer=5)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=2)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]
    loader.close()
    resumed = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=2, state=state)
    again = [next(resumed) for _ in range(6)]
    resumed.close()
    assert [b["key"] for b in again] == [b["key"] for b in expected]
    for a, b in zip(again, expected, strict=True):
        assert torch.equal(a["image"], b["image"])  # same crops: the crop seed travels with the sample


def test_bad_shard_trains_to_end_with_counts(tmp_path, tiny_overrides, caplog):
    from dinorankclip.train.trainer import train

    write_bad_shard(tmp_path / "bad.tar")
    cfg = load_config(None, list(tiny_overrides) + [
        "fusion.variant=none", f"data.train={tmp_path / 'bad.tar'}", "data.shuffle_buffer=0",
        "data.max_bad_fraction=0.5", "train.batch_size=2", "train.steps=8", f"train.output_dir={tmp_path / 'run'}",
    ])
    with caplog.at_level(logging.WARNING, logger="dinorankclip"):
        summary = train(cfg)
    # 14 good samples per pass: 7 steps read one pass and the 8th starts the next pass, after the
    # truncated tail of the first one.
    assert summary["steps"] == 8
    assert summary["samples_skipped"] == 6
    assert summary["samples_seen"] == 16 + 6
    for kind in BAD_MEMBERS.values():
        assert summary[f"skipped_{kind}"] == 1, kind
    state = json.loads((tmp_path / "run" / "training_state.json").read_text())
    assert state["skipped_duplicate_key"] == 1
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["samples_skipped"] == 6
    assert any("bad.tar key s013" in r.getMessage() and "duplicate_key" in r.getMessage() for r in caplog.records)


def _truncated_shard(path, count, cut):
    """Write ``count`` good samples and cut the file in the middle of sample ``cut``'s image."""
    write_good_shard(path, 0, count)
    with tarfile.open(path) as tar:
        member = tar.getmember(f"k{cut:05d}.jpg")
    with open(path, "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)


def test_buffer_fill_reads_truncated_shard_once(tmp_path):
    _truncated_shard(tmp_path / "cut.tar", 20, 14)
    keys, bad = _one_pass(tmp_path / "cut.tar")
    assert len(keys) == 14
    assert [b.kind for b in bad] == ["truncated_tar"]
    cfg = DataConfig(train=str(tmp_path / "cut.tar"), num_workers=0, shuffle_buffer=1000)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=0)
    first = next(loader)
    # One pass (14 samples and the truncation marker) fills the buffer. The first record of the next pass
    # triggers the first draw, and 3 more reads give the other 3 samples of the batch.
    assert [b.kind for b in first["bad"]] == ["truncated_tar"]
    assert first["num_samples"] == 14 + 1 + 4
    assert loader.state_dict()["workers"][0]["capacity"] == 15
    loader.close()


def test_capacity_survives_resume(tmp_path):
    _truncated_shard(tmp_path / "cut.tar", 20, 14)
    cfg = DataConfig(train=str(tmp_path / "cut.tar"), num_workers=0, shuffle_buffer=1000)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=0)
    next(loader)
    state = loader.state_dict()
    expected = [next(loader)["key"] for _ in range(6)]
    loader.close()
    resumed = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=4, seed=0, state=state)
    assert [next(resumed)["key"] for _ in range(6)] == expected
    resumed.close()


def test_truncated_shard_trains_with_default_buffer(tmp_path, tiny_overrides):
    from dinorankclip.train.trainer import train

    _truncated_shard(tmp_path / "cut.tar", 40, 30)
    cfg = load_config(None, list(tiny_overrides) + [
        "fusion.variant=none", f"data.train={tmp_path / 'cut.tar'}", "train.batch_size=8", "train.steps=6",
        f"train.output_dir={tmp_path / 'run'}",
    ])
    assert cfg.data.shuffle_buffer == 1000
    assert cfg.data.max_bad_fraction == 0.05
    summary = train(cfg)
    # Each pass reads 30 samples and one truncation marker. The fill reads the first pass, then each good
    # read gives one of the 6 × 8 samples, and the second pass's marker comes among them.
    assert summary["steps"] == 6
    assert summary["samples_seen"] == 31 + 48 + 1
    assert summary["samples_skipped"] == 2
    assert summary["skipped_truncated_tar"] == 2


def test_shards_smaller_than_batch_rejected(tmp_path):
    write_good_shard(tmp_path / "s.tar", 0, 20)
    (tmp_path / "sizes.json").write_text(json.dumps({"s.tar": 20}))
    cfg = DataConfig(train=str(tmp_path / "s.tar"), num_workers=0, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"has 20 samples \(sizes.json beside the shards\), fewer than "
                                         r"train.batch_size=128; lower the batch size"):
        build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=128, seed=0)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=20, seed=0)
    assert loader.num_samples == 20
    loader.close()


def test_num_samples_smaller_than_batch_rejected(tmp_path):
    write_good_shard(tmp_path / "s.tar", 0, 20)
    cfg = DataConfig(train=str(tmp_path / "s.tar"), num_workers=0, shuffle_buffer=0, num_samples=20)
    with pytest.raises(ValueError, match=r"has 20 samples \(data.num_samples\), fewer than train.batch_size=32"):
        build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=32, seed=0)


def test_shards_of_unknown_size_accepted(tmp_path):
    write_good_shard(tmp_path / "s.tar", 0, 20)
    cfg = DataConfig(train=str(tmp_path / "s.tar"), num_workers=0, shuffle_buffer=0)
    loader = build_train_data(cfg, transform=VIEWS, tokenizer=_tokenizer, batch_size=32, seed=0)
    assert loader.num_samples is None
    loader.close()


def test_training_rejects_shards_smaller_than_batch(tmp_path, sample_data, tiny_overrides):
    from dinorankclip.train.trainer import train

    rows = (sample_data / "flickr8k" / "train.csv").read_text().splitlines()[:21]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "images").symlink_to(sample_data / "flickr8k" / "images")
    assert cli_main(["data", "pack", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "shards")]) == 0
    cfg = load_config(None, list(tiny_overrides) + [
        "fusion.variant=none", f"data.train={tmp_path / 'shards' / 'shard-000000.tar'}", "train.batch_size=128",
        f"train.output_dir={tmp_path / 'run'}",
    ])
    with pytest.raises(ValueError, match="has 20 samples .* fewer than train.batch_size=128"):
        train(cfg)


def _pack_table(tmp_path, sample_data, count):
    """Write a table of ``count`` real images beside a link to the image folder; returns its path."""
    images = tmp_path / "images"
    if not images.exists():
        images.symlink_to(sample_data / "flickr8k" / "images")
    names = [p.name for p in sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[:count]]
    table = tmp_path / f"pairs{count}.csv"
    table.write_text("filepath,caption\n" + "".join(f"images/{n},caption of {n}\n" for n in names))
    return table


def test_pack_skips_undecodable_images(tmp_path, sample_data, capsys):
    good = sorted((sample_data / "flickr8k" / "images").glob("*.jpg"))[:3]
    (tmp_path / "random.jpg").write_bytes(random.Random(0).randbytes(4000))
    (tmp_path / "truncated.jpg").write_bytes(good[0].read_bytes()[:2000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = [str(p) for p in good] + ["random.jpg", "truncated.jpg", "empty.jpg", "missing.jpg"]
    table = tmp_path / "pairs.csv"
    table.write_text("filepath,caption\n" + "".join(f"{r},caption {i}\n" for i, r in enumerate(rows)))
    assert cli_main(["data", "pack", str(table), "--out", str(tmp_path / "shards")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3
    assert summary["skipped"] == 4
    assert summary["skipped_decode_error"] == 2
    assert summary["skipped_empty_image"] == 1
    assert summary["skipped_missing_file"] == 1
    keys, bad = _one_pass(tmp_path / "shards" / "shard-000000.tar")
    assert keys == ["000000000", "000000001", "000000002"]
    assert bad == []


def test_pack_rejects_existing_shards(tmp_path, sample_data, capsys):
    out = tmp_path / "shards"
    assert cli_main(["data", "pack", str(_pack_table(tmp_path, sample_data, 7)), "--out", str(out),
                     "--shard-size", "3"]) == 0
    sizes_before = (out / "sizes.json").read_text()
    capsys.readouterr()
    assert cli_main(["data", "pack", str(_pack_table(tmp_path, sample_data, 4)), "--out", str(out),
                     "--shard-size", "3"]) == 2
    error = capsys.readouterr().err
    assert "already contains 3 shards named shard-*.tar" in error
    assert "shard-000000.tar, shard-000001.tar, shard-000002.tar" in error
    assert "--overwrite" in error
    assert (out / "sizes.json").read_text() == sizes_before
    assert shard_sizes(expand_shards(str(out / "shard-{000000..000002}.tar"))) == 7


def test_pack_rejects_bad_prefix_and_file_out(tmp_path, sample_data):
    table = _pack_table(tmp_path, sample_data, 2)
    with pytest.raises(ValueError, match="shard prefix 'a/b' is invalid"):
        pack_shards(table, tmp_path / "out", prefix="a/b")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("keep me")
    with pytest.raises(ValueError, match="is an existing file"):
        pack_shards(table, not_a_folder)
    assert not_a_folder.read_text() == "keep me"


def test_pack_missing_column_names_flag(tmp_path, sample_data):
    with pytest.raises(ValueError, match="set --caption-column=<column>"):
        pack_shards(_pack_table(tmp_path, sample_data, 2), tmp_path / "out", caption_column="text")


def test_pack_overwrite_removes_stale_shards(tmp_path, sample_data, capsys):
    out = tmp_path / "shards"
    assert cli_main(["data", "pack", str(_pack_table(tmp_path, sample_data, 7)), "--out", str(out),
                     "--shard-size", "3"]) == 0
    assert cli_main(["data", "pack", str(_pack_table(tmp_path, sample_data, 2)), "--out", str(out),
                     "--shard-size", "3", "--prefix", "other"]) == 0
    capsys.readouterr()
    assert cli_main(["data", "pack", str(_pack_table(tmp_path, sample_data, 4)), "--out", str(out),
                     "--shard-size", "3", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 2
    assert summary["removed_shards"] == 1
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"other-000000.tar": 2, "shard-000000.tar": 3, "shard-000001.tar": 1}
