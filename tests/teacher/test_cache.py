"""Teacher feature cache: contents, PCA, resuming, identity checks and lookups, on real Flickr8k images."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_dinov3 import make_tiny_model

from dinorankclip.config import load_config
from dinorankclip.data.images import ImageDecodeError, load_image
from dinorankclip.data.transforms import PairedViews
from dinorankclip.teacher import build_teacher
from dinorankclip.teacher.cache import (
    TeacherCache,
    TeacherCacheError,
    check_cache_matches,
    load_pca,
    project_output,
    weights_fingerprint,
)
from dinorankclip.teacher.cache_build import (
    CacheBuildSettings,
    _CovarianceAccumulator,
    build_teacher_cache,
    evaluation_view,
    table_samples,
)
from dinorankclip.train.teacher_source import CachedTeacher, build_teacher_source

IMAGE_SIZE = 32
BLOCKS = [0, 1]
TEACHER_NAME = "vit_small_patch16_dinov3"
MODEL_KWARGS = {"depth": 2}
NUM_IMAGES = 12
CAPTIONS_PER_IMAGE = 5
SETTINGS = CacheBuildSettings(pca_dim=16, shard_size=4, batch_size=4, num_threads=2)


@pytest.fixture(scope="module")
def table(tmp_path_factory, sample_data) -> Path:
    """A caption table of 12 real Flickr8k images with 5 captions each, images copied beside it."""
    folder = tmp_path_factory.mktemp("flickr_subset")
    (folder / "images").mkdir()
    source = sample_data / "flickr8k"
    with (source / "train.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[: NUM_IMAGES * CAPTIONS_PER_IMAGE]
    for row in rows:
        shutil.copy(source / row["filepath"], folder / row["filepath"])
    with (folder / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "caption"])
        writer.writeheader()
        writer.writerows({"filepath": r["filepath"], "caption": r["caption"]} for r in rows)
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(TEACHER_NAME, "random", blocks=tuple(BLOCKS), **MODEL_KWARGS)


def _build(teacher, table: Path, out: Path, samples=None, settings=SETTINGS, weights=None):
    samples = table_samples(table) if samples is None else samples
    return build_teacher_cache(
        teacher,
        samples,
        out,
        pca_samples=table_samples(table),
        model_kwargs=MODEL_KWARGS,
        weights_fingerprint=weights or weights_fingerprint("random", random_seed=0),
        requested_blocks=BLOCKS,
        image_size=IMAGE_SIZE,
        data_path=str(table),
        settings=settings,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher, table) -> Path:
    out = tmp_path_factory.mktemp("cache")
    _build(teacher, table, out)
    return out


def _config(cache: Path, table: Path, *extra: str):
    return load_config(None, [
        f"teacher.name={TEACHER_NAME}", "teacher.weights=random", f"teacher.image_size={IMAGE_SIZE}",
        f"teacher.blocks={BLOCKS}", "teacher.model_kwargs={depth: 2}", f"teacher.cache={cache}",
        f"data.train={table}", *extra,
    ])


def test_manifest_counts_distinct_images(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["data"]["rows"] == NUM_IMAGES * CAPTIONS_PER_IMAGE
    assert manifest["data"]["keys"] == NUM_IMAGES
    assert manifest["data"]["duplicates"] == NUM_IMAGES * (CAPTIONS_PER_IMAGE - 1)
    assert manifest["data"]["cached"] == NUM_IMAGES
    assert [shard["keys"] for shard in manifest["shards"]] == [4, 4, 4]
    assert manifest["teacher"]["weights_fingerprint"] == {"kind": "random", "seed": 0}
    assert manifest["blocks"] == [0, 1]
    assert manifest["grid"] == [2, 2]


def test_shards_store_float16_pca_tokens(cache_dir):
    shard = safetensors.torch.load_file(str(cache_dir / "shard-000000.safetensors"))
    assert shard["cls"].shape == (4, 16)
    assert shard["level_0"].shape == (4, 4, 16)
    assert shard["level_1"].shape == (4, 4, 16)
    assert all(tensor.dtype == torch.float16 for tensor in shard.values())


def test_evaluation_view_matches_paired_views(table):
    key, loader = table_samples(table)[0]
    image = loader()
    views = PairedViews(image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3, teacher_size=IMAGE_SIZE, train=False)
    assert torch.equal(evaluation_view(image, IMAGE_SIZE), views(image)["teacher_view"])


def test_cached_features_equal_projected_teacher(cache_dir, teacher, table):
    """Cached tokens are the PCA projection of the teacher's tokens on the centre-crop view, to float16 precision."""
    cache = TeacherCache(cache_dir)
    keys = list(dict(table_samples(table)))[:6]
    views = torch.stack([evaluation_view(load_image(table.parent / key), IMAGE_SIZE) for key in keys])
    expected = project_output(teacher(views), cache.pca)
    cached = cache.lookup(keys)

    assert cached.grid_size == (2, 2)
    assert cached.cls.dtype == torch.float32
    torch.testing.assert_close(cached.cls, expected.cls, rtol=2e-3, atol=2e-3)
    for got, want in zip(cached.patch_levels, expected.patch_levels, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert cached.patch is cached.patch_levels[-1]


def test_pca_basis_orthonormal_and_ordered(cache_dir):
    for name, basis in load_pca(cache_dir / "pca.safetensors").items():
        components = basis.components.double()
        torch.testing.assert_close(components @ components.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
        assert 0.0 < basis.explained <= 1.0, name


def test_covariance_pca_matches_svd():
    torch.manual_seed(0)
    scales = torch.linspace(3.0, 0.1, 10)
    tokens = torch.randn(500, 10) * scales @ torch.linalg.qr(torch.randn(10, 10))[0] + 2.0
    accumulator = _CovarianceAccumulator(10, torch.device("cpu"))
    accumulator.update(tokens[:200])
    accumulator.update(tokens[200:])
    basis = accumulator.fit(4)

    centred = tokens.double() - tokens.double().mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    overlap = (basis.components.double() @ vh[:4].T).abs()  # [4, 4], identity up to sign
    torch.testing.assert_close(overlap, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    expected_explained = float((singular[:4] ** 2).sum() / (singular**2).sum())
    assert basis.explained == pytest.approx(expected_explained, rel=1e-5)
    torch.testing.assert_close(basis.mean.double(), tokens.double().mean(0), atol=1e-5, rtol=0)


class _Interrupted(RuntimeError):
    pass


def _counting(samples, decoded: list[str], stop_after: int | None = None):
    """Wrap loaders so each decode is recorded; raise after ``stop_after`` distinct keys to simulate a crash."""
    distinct = []
    for key, loader in samples:
        if key not in distinct:
            distinct.append(key)
            if stop_after is not None and len(distinct) > stop_after:
                raise _Interrupted("build interrupted")

        def load(key=key, loader=loader):
            decoded.append(key)
            return loader()

        yield key, load


def test_resume_skips_finished_shards(tmp_path, teacher, table, cache_dir):
    out = tmp_path / "cache"
    with pytest.raises(_Interrupted):
        _build(teacher, table, out, samples=_counting(table_samples(table), [], stop_after=9))
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(TeacherCacheError, match="unfinished"):
        TeacherCache(out)
    first_shard = (out / "shard-000000.safetensors").stat().st_mtime_ns

    decoded: list[str] = []
    manifest = _build(teacher, table, out, samples=_counting(table_samples(table), decoded))
    keys = list(dict(table_samples(table)))
    assert sorted(decoded) == sorted(keys[8:])  # the first two shards (8 images) were not decoded again
    assert (out / "shard-000000.safetensors").stat().st_mtime_ns == first_shard
    assert manifest["data"]["cached"] == NUM_IMAGES

    resumed, complete = TeacherCache(out).lookup(keys), TeacherCache(cache_dir).lookup(keys)
    for got, want in zip((resumed.cls, *resumed.patch_levels), (complete.cls, *complete.patch_levels), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_finished_cache_rerun_encodes_nothing(teacher, table, cache_dir):
    decoded: list[str] = []
    manifest = _build(teacher, table, cache_dir, samples=_counting(table_samples(table), decoded))
    assert decoded == []
    assert manifest["data"]["cached"] == NUM_IMAGES


def test_build_rejects_folder_of_other_build(teacher, table, cache_dir):
    other = CacheBuildSettings(pca_dim=8, shard_size=4, batch_size=4)
    with pytest.raises(TeacherCacheError, match="pca_dim: before 16, now 8"):
        _build(teacher, table, cache_dir, settings=other)


def test_build_rejects_changed_data(tmp_path, teacher, table):
    out = tmp_path / "cache"
    with pytest.raises(_Interrupted):
        _build(teacher, table, out, samples=_counting(table_samples(table), [], stop_after=5))
    reordered = list(reversed(table_samples(table)))
    with pytest.raises(TeacherCacheError, match="data changed"):
        _build(teacher, table, out, samples=reordered)


def test_unreadable_image_skipped_and_counted(tmp_path, teacher, table):
    samples = table_samples(table)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    samples.append(("broken.jpg", lambda: load_image(broken)))
    manifest = _build(teacher, table, tmp_path / "cache", samples=samples,
                      settings=CacheBuildSettings(pca_dim=16, shard_size=4, batch_size=4, max_bad_fraction=0.5))
    assert manifest["data"]["bad"] == 1
    assert manifest["data"]["cached"] == NUM_IMAGES
    assert manifest["data"]["bad_examples"][0]["key"] == "broken.jpg"
    assert "broken.jpg" not in TeacherCache(tmp_path / "cache")


def test_too_many_unreadable_images_stop_build(tmp_path, teacher, table):
    def broken():
        raise ImageDecodeError("unreadable")

    samples = [(f"missing{i}.jpg", broken) for i in range(70)]
    with pytest.raises(ValueError, match="could not be read"):
        _build(teacher, table, tmp_path / "cache", samples=samples)


def test_lookup_names_missing_key(cache_dir):
    with pytest.raises(TeacherCacheError, match="'images/not_there.jpg' is not in the teacher cache"):
        TeacherCache(cache_dir).lookup(["images/not_there.jpg"])


def test_training_table_with_uncached_image_rejected(tmp_path, cache_dir, table):
    extended = tmp_path / "pairs.csv"
    extended.write_text(table.read_text() + "images/extra.jpg,a caption\n")
    with pytest.raises(TeacherCacheError, match="lacks 1 image keys.*'images/extra.jpg'"):
        CachedTeacher(_config(cache_dir, extended), torch.device("cpu"))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("teacher.name=vit_small_patch16_dinov3_qkvb", "teacher.name: cache 'vit_small_patch16_dinov3'"),
        ("teacher.image_size=48", "teacher.image_size: cache 32, config 48"),
        ("teacher.blocks=[-1]", "teacher.blocks: cache [0, 1]"),
        ("teacher.model_kwargs={depth: 3}", "teacher.model_kwargs: cache {'depth': 2}"),
    ],
)
def test_stale_cache_rejected(cache_dir, table, override, named):
    with pytest.raises(TeacherCacheError, match="different teacher settings") as error:
        build_teacher_source(_config(cache_dir, table, override), torch.device("cpu"))
    assert named in str(error.value)


def test_cache_of_other_weights_file_rejected(tmp_path, table):
    """A cache made from one weights file rejects a config naming another file, and accepts the same file."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    safetensors.torch.save_file(make_tiny_model(TEACHER_NAME, seed=1, depth=2).state_dict(), str(first))
    safetensors.torch.save_file(make_tiny_model(TEACHER_NAME, seed=2, depth=2).state_dict(), str(second))
    kwargs = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    teacher = build_teacher(TEACHER_NAME, first, blocks=tuple(BLOCKS), **kwargs)
    out = tmp_path / "cache"
    build_teacher_cache(
        teacher, table_samples(table), out, pca_samples=table_samples(table), model_kwargs=kwargs,
        weights_fingerprint=weights_fingerprint(first), requested_blocks=BLOCKS, image_size=IMAGE_SIZE,
        data_path=str(table), settings=SETTINGS,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    teacher_cfg = _config(out, table, "teacher.model_kwargs={embed_dim: 64, depth: 2, num_heads: 2}").teacher

    teacher_cfg.weights = str(first)
    check_cache_matches(manifest, teacher_cfg, cache_dir=out)
    teacher_cfg.weights = str(second)
    with pytest.raises(TeacherCacheError, match="teacher.weights: cache made from .*first.safetensors"):
        check_cache_matches(manifest, teacher_cfg, cache_dir=out)
    teacher_cfg.weights = "random"
    with pytest.raises(TeacherCacheError, match="teacher.weights"):
        check_cache_matches(manifest, teacher_cfg, cache_dir=out)


def test_cache_source_never_builds_teacher(cache_dir, table):
    """With a cache, training needs no teacher weights: teacher.weights=null is accepted, the teacher not built."""
    cfg = _config(cache_dir, table, "teacher.weights=null")
    source, geometry = build_teacher_source(cfg, torch.device("cpu"))
    assert isinstance(source, CachedTeacher)
    assert not hasattr(source, "teacher")
    assert (geometry.dim, geometry.grid, geometry.blocks, geometry.depth, geometry.image_size) == (16, (2, 2), (0, 1),
                                                                                                 2, IMAGE_SIZE)
    keys = list(dict(table_samples(table)))[:3]
    output = source({"key": keys})
    assert output.cls.shape == (3, 16)
    assert output.patch_levels[0].shape == (3, 4, 16)


def test_random_teacher_seed_mismatch_warns(cache_dir, table, caplog):
    """A random-teacher cache is accepted under another seed, with a warning that names both seeds."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    teacher_cfg = _config(cache_dir, table).teacher
    with caplog.at_level(logging.WARNING, logger="dinorankclip.teacher.cache"):
        check_cache_matches(manifest, teacher_cfg, cache_dir=cache_dir, seed=0)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dinorankclip.teacher.cache"):
        check_cache_matches(manifest, teacher_cfg, cache_dir=cache_dir, seed=7)
    assert "with seed 0" in caplog.text
    assert "train.seed=7" in caplog.text
    assert "--seed 7" in caplog.text


def test_weights_fingerprint_forms(tmp_path):
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(file))
    (tmp_path / "config.json").write_text("{}")
    assert weights_fingerprint("random", random_seed=3) == {"kind": "random", "seed": 3}
    by_file = weights_fingerprint(file)
    by_folder = weights_fingerprint(tmp_path)
    assert by_file["kind"] == "file"
    assert len(by_file["sha256"]) == 64
    assert by_folder["kind"] == "folder"
    assert by_folder["sha256"] != by_file["sha256"]
    with pytest.raises(FileNotFoundError, match="not found"):
        weights_fingerprint(tmp_path / "absent.pth")


def test_online_teacher_projects_with_cache_pca(cache_dir, table):
    """Evaluating a teacher-injection model trained on a cache runs the teacher and applies the cache's PCA."""
    from dinorankclip.train.teacher_source import OnlineTeacher

    cfg = _config(cache_dir, table, "fusion.injection_source=teacher")
    torch.manual_seed(0)  # the seed the cache's random teacher was built with
    online = OnlineTeacher(cfg, torch.device("cpu"))
    assert online.geometry.dim == 16

    keys = list(dict(table_samples(table)))[:4]
    views = torch.stack([evaluation_view(load_image(table.parent / key), IMAGE_SIZE) for key in keys])
    projected = online({"teacher_view": views})
    cached = TeacherCache(cache_dir).lookup(keys)
    torch.testing.assert_close(projected.cls, cached.cls, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(projected.patch, cached.patch, rtol=2e-3, atol=2e-3)


def _table_with_unreadable_images(folder: Path, table: Path) -> Path:
    """Copy ``table`` into ``folder`` with two more rows: a corrupt JPEG and an empty one."""
    (folder / "images").symlink_to(table.parent / "images")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "empty.jpg").write_bytes(b"")
    extended = folder / "corrupt.csv"
    extended.write_text(table.read_text() + "bad.jpg,a caption\nempty.jpg,another caption\n")
    return extended


def test_manifest_lists_unreadable_keys(tmp_path, teacher, table):
    corrupt = _table_with_unreadable_images(tmp_path, table)
    manifest = _build(teacher, corrupt, tmp_path / "cache")
    assert manifest["data"]["bad"] == 2
    assert manifest["data"]["skipped_keys"] == ["bad.jpg", "empty.jpg"]
    cache = TeacherCache(tmp_path / "cache")
    assert sorted(cache.skipped) == ["bad.jpg", "empty.jpg"]
    assert "empty" in cache.skipped["empty.jpg"]


def test_unreadable_keys_survive_resume(tmp_path, teacher, table):
    """Keys skipped by an interrupted build are listed after the build resumes."""
    corrupt = _table_with_unreadable_images(tmp_path, table)
    samples = table_samples(corrupt)
    samples = samples[-2:] + samples[:-2]  # the unreadable images land in the first shard
    out = tmp_path / "cache"
    with pytest.raises(_Interrupted):
        _build(teacher, corrupt, out, samples=_counting(samples, [], stop_after=8))
    manifest = _build(teacher, corrupt, out, samples=samples)
    assert manifest["data"]["skipped_keys"] == ["bad.jpg", "empty.jpg"]


def test_cache_without_skipped_list_reads_shards(tmp_path, teacher, table):
    corrupt = _table_with_unreadable_images(tmp_path, table)
    _build(teacher, corrupt, tmp_path / "cache")
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["data"]["skipped_keys"]
    manifest_path.write_text(json.dumps(manifest))
    assert sorted(TeacherCache(tmp_path / "cache").skipped) == ["bad.jpg", "empty.jpg"]


def test_training_table_with_unreadable_images_accepted(tmp_path, teacher, table):
    corrupt = _table_with_unreadable_images(tmp_path, table)
    _build(teacher, corrupt, tmp_path / "cache")
    source = CachedTeacher(_config(tmp_path / "cache", corrupt), torch.device("cpu"))
    assert len(source.cache) == NUM_IMAGES

    (tmp_path / "extra.csv").write_text(corrupt.read_text() + "images/extra.jpg,a caption\n")
    with pytest.raises(TeacherCacheError, match="lacks 1 image keys.*'images/extra.jpg'") as error:
        CachedTeacher(_config(tmp_path / "cache", tmp_path / "extra.csv"), torch.device("cpu"))
    assert "bad.jpg" not in str(error.value)
    assert "--out NEW_FOLDER" in str(error.value)


def test_image_readable_since_build_rejected(tmp_path, teacher, table):
    corrupt = _table_with_unreadable_images(tmp_path, table)
    _build(teacher, corrupt, tmp_path / "cache")
    first_image = next(iter(dict(table_samples(table))))
    shutil.copy(table.parent / first_image, tmp_path / "bad.jpg")
    with pytest.raises(TeacherCacheError, match="1 images .* can be read now: 'bad.jpg'") as error:
        CachedTeacher(_config(tmp_path / "cache", corrupt), torch.device("cpu"))
    assert "--out NEW_FOLDER" in str(error.value)
    with pytest.raises(TeacherCacheError, match="'bad.jpg' has no features .* could not be read when the cache"):
        TeacherCache(tmp_path / "cache").lookup(["bad.jpg"])
