"""Build a teacher feature cache: run the frozen teacher once over a dataset and store PCA-reduced float16 tokens.

The builder reads any iterable of ``(key, image)`` pairs, where ``image`` is an RGB PIL image or a function that
returns one (so a restart can skip finished samples without decoding them). Tables and WebDataset shards both fit
this form. Two passes run over the data:

1. the teacher encodes a sample of the images (``pca_samples``) and a PCA basis is fitted per block and for the
   CLS token from the exact token covariance (float64);
2. the teacher encodes every distinct key, the tokens are projected to the basis, stored as float16 and written
   in shards of ``shard_size`` samples, each shard atomically, so an interrupted build resumes at the first
   unfinished shard.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from PIL import Image
from safetensors import safe_open
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from dinorankclip.data.csv_dataset import BadSample, read_table
from dinorankclip.data.images import ImageDecodeError, decode_image, load_image
from dinorankclip.data.shards import CaptionSpec, RawRecord, ShardPlan, ShardReader, expand_shards
from dinorankclip.data.transforms import PairedViews
from dinorankclip.teacher.cache import (
    BUILD_FILE,
    CACHE_FORMAT,
    CACHE_VERSION,
    CLS_NAME,
    MANIFEST_FILE,
    PCA_FILE,
    PcaBasis,
    TeacherCacheError,
    level_name,
    load_pca,
    save_pca,
    sha256_file,
    shard_file_name,
)
from dinorankclip.teacher.dinov3 import DinoV3Teacher, teacher_input_size
from dinorankclip.train.checkpoint import atomic_write

__all__ = [
    "CacheBuildSettings",
    "ImageSource",
    "build_teacher_cache",
    "evaluation_view",
    "fit_pca",
    "shard_samples",
    "table_samples",
]

logger = logging.getLogger(__name__)

ImageSource = Image.Image | Callable[[], Image.Image]
# Below this many processed samples the bad-sample fraction is not checked yet (one bad file among the first few
# would otherwise stop the build).
MIN_SAMPLES_FOR_BAD_CHECK = 64
MAX_BAD_EXAMPLES = 20  # unreadable samples named in the log and the manifest


@dataclass
class CacheBuildSettings:
    """Settings of a cache build.

    Attributes:
        pca_dim: PCA width W of every stored token (at most the teacher width).
        shard_size: samples per shard file.
        batch_size: images per teacher forward pass.
        num_threads: threads that decode and crop images while the teacher runs.
        max_bad_fraction: stop when more than this fraction of the distinct samples cannot be read.
    """

    pca_dim: int = 256
    shard_size: int = 256
    batch_size: int = 64
    num_threads: int = 4
    max_bad_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("pca_dim", "shard_size", "batch_size", "num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"teacher cache setting {name}={value!r} is invalid; it must be an integer >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"teacher cache setting max_bad_fraction={self.max_bad_fraction!r} must lie in [0, 1]")


def _write_file(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically and make it readable by everyone, as a shared dataset file should be."""

    def write_readable(tmp: str) -> None:
        write(tmp)
        os.chmod(tmp, 0o644)  # the temporary file is created private (0600)

    atomic_write(path, write_readable)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    _write_file(path, lambda tmp: Path(tmp).write_text(text))


def evaluation_view(image: Image.Image, size: int) -> torch.Tensor:
    """Return the teacher's evaluation view ``[3, size, size]`` in [0, 1]: the centre square, resized.

    This is the ``teacher_view`` that ``PairedViews(train=False)`` gives for the same image.

    NOTE: the cache decodes images at full size. A training loader with ``data.decode_draft`` decodes large
    JPEGs at a reduced scale first, so its views differ from these by resampling, not by the crop.
    """
    top, left, height, width = PairedViews(image_size=size, mean=(0, 0, 0), std=(1, 1, 1)).crop_box(image)
    crop = image.crop((left, top, left + width, top + height))
    return TF.to_tensor(TF.resize(crop, [size, size], InterpolationMode.BICUBIC, antialias=True))


def _load_view(source: ImageSource, size: int) -> torch.Tensor | ImageDecodeError:
    """Decode (when ``source`` is a function) and crop one image; a decoding error is returned, not raised."""
    try:
        image = source() if callable(source) else source
    except ImageDecodeError as error:
        return error
    return evaluation_view(image, size)


class _CovarianceAccumulator:
    """Streaming mean and covariance of token rows, in float64."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1]).double()  # [n, D]
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.outer += rows.T @ rows

    def fit(self, width: int) -> PcaBasis:
        """Return the top ``width`` principal directions, each signed so its largest entry is positive."""
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues = eigenvalues.flip(0).clamp_min(0)
        components = eigenvectors.flip(1)[:, :width].T  # [W, D]
        largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
        components = components * torch.sign(largest)
        explained = float(eigenvalues[:width].sum() / eigenvalues.sum().clamp_min(1e-30))
        return PcaBasis(mean.float().cpu(), components.float().cpu(), explained)


def _batches(pairs: Iterable[tuple[Any, str, ImageSource]], batch_size: int) -> Iterable[list]:
    batch = []
    for item in pairs:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_teacher(teacher: DinoV3Teacher, views: list[torch.Tensor], device: torch.device):
    images = torch.stack(views).to(device, non_blocking=True)
    return teacher(images)


def fit_pca(
    teacher: DinoV3Teacher,
    pca_samples: Iterable[tuple[str, ImageSource]],
    *,
    image_size: int,
    settings: CacheBuildSettings,
    device: torch.device,
) -> tuple[dict[str, PcaBasis], int]:
    """Fit one PCA basis per selected block (patch tokens) and one for the CLS token.

    Args:
        teacher: the frozen teacher, on ``device``.
        pca_samples: ``(key, image)`` pairs to fit on; repeated keys are used once.
        image_size: teacher view size in pixels.
        settings: build settings (``pca_dim``, ``batch_size``, ``num_threads``).
        device: where the teacher runs.

    Returns:
        The bases keyed by ``cls`` and ``level_j``, and the number of images they were fitted on.
    """
    if settings.pca_dim > teacher.embed_dim:
        raise ValueError(
            f"PCA width {settings.pca_dim} exceeds the teacher width {teacher.embed_dim}; choose at most "
            f"{teacher.embed_dim}"
        )
    names = [CLS_NAME] + [level_name(i) for i in range(len(teacher.blocks))]
    accumulators = {name: _CovarianceAccumulator(teacher.embed_dim, device) for name in names}
    seen: set[str] = set()
    unique = ((None, key, source) for key, source in pca_samples if not (key in seen or seen.add(key)))
    num_images = 0
    with ThreadPoolExecutor(settings.num_threads) as pool:
        for batch in tqdm(_batches(unique, settings.batch_size), desc="teacher-cache PCA", unit="batch"):
            views = [view for view in pool.map(lambda item: _load_view(item[2], image_size), batch)
                     if isinstance(view, torch.Tensor)]
            if not views:
                continue
            output = _run_teacher(teacher, views, device)
            accumulators[CLS_NAME].update(output.cls)
            for i, level in enumerate(output.patch_levels):
                accumulators[level_name(i)].update(level)
            num_images += len(views)
    if num_images < 2:
        raise ValueError(f"the PCA sample has {num_images} readable images; at least 2 are needed")
    if num_images < settings.pca_dim:
        logger.warning(
            "The CLS PCA is fitted on %d images, fewer than its width %d: the last %d directions carry no variance "
            "of the sample", num_images, settings.pca_dim, settings.pca_dim - num_images + 1,
        )
    bases = {name: accumulator.fit(settings.pca_dim) for name, accumulator in accumulators.items()}
    return bases, num_images


class _ShardWriter:
    """Collects encoded samples in ordinal order and writes each shard once it contains ``shard_size`` samples.

    Shards finished by an earlier run are read once for their keys and never rewritten.
    """

    def __init__(self, out_dir: Path, *, names: list[str], shapes: Mapping[str, tuple[int, ...]], shard_size: int):
        self.out_dir = out_dir
        self.names = names
        self.shapes = shapes
        self.shard_size = shard_size
        self.records: dict[int, dict[str, Any]] = {}
        self.finished: dict[int, dict[str, Any]] = {}
        for path in sorted(out_dir.glob("shard-*.safetensors")):
            self.finished[int(path.stem.split("-")[1])] = _read_finished_shard(path)
        self._start(0)

    def _start(self, index: int) -> None:
        self.index = index
        self.keys: list[str] = []
        self.bad: list[dict[str, str]] = []
        self.rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def is_finished(self, ordinal: int) -> bool:
        return ordinal // self.shard_size in self.finished

    def add(self, ordinal: int, key: str, features: Mapping[str, torch.Tensor] | None, reason: str = "") -> None:
        """Add one sample: its ``[1, ...]`` float16 features by tensor name, or None and why it is unreadable."""
        index = ordinal // self.shard_size
        if index != self.index:  # the first sample after shards finished in an earlier run
            self.flush()
            self._start(index)
        if features is None:
            self.bad.append({"key": key, "reason": reason})
        else:
            self.keys.append(key)
            for name in self.names:
                self.rows[name].append(features[name])
        if len(self.keys) + len(self.bad) == self.shard_size:
            self.flush()
            self._start(index + 1)

    def flush(self) -> None:
        """Write the shard being filled, unless it is empty or was finished earlier."""
        if not (self.keys or self.bad) or self.index in self.finished:
            return
        tensors = {}
        for name in self.names:
            rows = self.rows[name]
            tensors[name] = torch.cat(rows) if rows else torch.zeros((0, *self.shapes[name]), dtype=torch.float16)
        metadata = {"keys": json.dumps(self.keys), "bad": json.dumps(self.bad)}
        file = shard_file_name(self.index)
        _write_file(self.out_dir / file, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
        self.records[self.index] = {"file": file, "keys": len(self.keys), "bad": len(self.bad)}

    def verify(self, index: int, keys: set[str]) -> None:
        """Raise ``TeacherCacheError`` unless the earlier shard ``index`` contains exactly ``keys``."""
        record = self.finished[index]
        if keys != record["all_keys"]:
            raise TeacherCacheError(
                f"{self.out_dir / record['file']} contains other samples than the data now gives for it, so the "
                "data changed since the interrupted build. Delete the folder and build the cache again"
            )

    def check_finished(self, streamed: Mapping[int, set[str]]) -> list[dict[str, str]]:
        """Check every earlier shard against the keys the data gave for it; return their bad samples."""
        bad = []
        for index, record in sorted(self.finished.items()):
            self.verify(index, streamed.get(index, set()))
            self.records[index] = {key: record[key] for key in ("file", "keys", "bad")}
            bad.extend(record["bad_list"])
        return bad


def _read_finished_shard(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    keys, bad = json.loads(metadata["keys"]), json.loads(metadata["bad"])
    return {"file": path.name, "keys": len(keys), "bad": len(bad), "all_keys": set(keys) | {b["key"] for b in bad},
            "bad_list": bad}


def _start_build(out_dir: Path, build: dict[str, Any]) -> bool:
    """Write ``build.json`` or check it against a previous one; return True when the cache is already finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_path = out_dir / BUILD_FILE
    if previous_path.is_file():
        previous = json.loads(previous_path.read_text())
        differences = [
            f"{key}: before {previous.get(key)!r}, now {value!r}"
            for key, value in build.items()
            if previous.get(key) != value
        ]
        if differences:
            raise TeacherCacheError(
                f"{out_dir} contains a teacher cache built with other settings ({'; '.join(differences)}). "
                "Choose another --out folder or delete this one"
            )
        if (out_dir / MANIFEST_FILE).is_file():
            return True
        logger.info("Resuming the teacher cache build in %s", out_dir)
    elif any(out_dir.iterdir()):
        raise TeacherCacheError(f"{out_dir} is not empty and contains no teacher cache build; choose an empty folder")
    else:
        _write_json(previous_path, build)
    return False


def _build_record(
    teacher: DinoV3Teacher,
    *,
    model_kwargs: Mapping[str, Any],
    weights_fingerprint: Mapping[str, Any],
    requested_blocks: list[int],
    image_size: int,
    data_path: str,
    settings: CacheBuildSettings,
) -> dict[str, Any]:
    """Describe what the cache is made of; a restart must describe the same build."""
    input_h, input_w = teacher_input_size(image_size, image_size, teacher.patch_size)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "teacher": {
            "name": teacher.model_name,
            "model_kwargs": dict(model_kwargs),
            "weights": str(teacher.weights),
            "weights_fingerprint": dict(weights_fingerprint),
            "embed_dim": teacher.embed_dim,
            "depth": teacher.num_blocks,
            "patch_size": teacher.patch_size,
        },
        "image_size": image_size,
        "crop": "centre square resized to image_size (bicubic, antialiased), as PairedViews(train=False)",
        "requested_blocks": list(requested_blocks),
        "blocks": list(teacher.blocks),
        "grid": [input_h // teacher.patch_size, input_w // teacher.patch_size],
        "pca_dim": settings.pca_dim,
        "shard_size": settings.shard_size,
        "dtype": "float16",
        "data_path": data_path,
    }


def _encode(
    teacher: DinoV3Teacher, views: list[torch.Tensor], bases: Mapping[str, PcaBasis], device: torch.device
) -> dict[str, torch.Tensor]:
    """Run the teacher on ``views`` and return float16 PCA coordinates on the CPU by tensor name."""
    output = _run_teacher(teacher, views, device)
    projected = {CLS_NAME: bases[CLS_NAME].project(output.cls)}
    for j, level in enumerate(output.patch_levels):
        projected[level_name(j)] = bases[level_name(j)].project(level)
    projected = {name: value.half().cpu() for name, value in projected.items()}
    if not all(torch.isfinite(value).all() for value in projected.values()):
        raise ValueError("PCA coordinates overflow float16; the teacher output is not finite or too large")
    return projected


def build_teacher_cache(
    teacher: DinoV3Teacher,
    samples: Iterable[tuple[str, ImageSource]],
    out_dir: str | Path,
    *,
    pca_samples: Iterable[tuple[str, ImageSource]],
    model_kwargs: Mapping[str, Any],
    weights_fingerprint: Mapping[str, Any],
    requested_blocks: list[int],
    image_size: int,
    data_path: str,
    settings: CacheBuildSettings | None = None,
    device: torch.device | str = "cpu",
    total: int | None = None,
) -> dict[str, Any]:
    """Run ``teacher`` over every distinct sample of ``samples`` and write the cache folder ``out_dir``.

    A second call with the same settings resumes an interrupted build (finished shards are kept and their
    samples are not decoded again) or returns at once for a finished cache.

    Args:
        teacher: the frozen teacher (moved to ``device`` here).
        samples: ``(key, image)`` pairs in a fixed order; a repeated key (one image with several captions) is
            encoded once. ``image`` is a PIL image or a function returning one, which may raise
            ``ImageDecodeError`` for an unreadable file (counted and skipped).
        out_dir: the cache folder, empty or holding an earlier build with the same settings.
        pca_samples: the ``(key, image)`` pairs the PCA is fitted on, e.g. a random subset of ``samples``.
        model_kwargs: the timm arguments the teacher was built with.
        weights_fingerprint: :func:`~dinorankclip.teacher.cache.weights_fingerprint` of the teacher's weights.
        requested_blocks: ``teacher.blocks`` as configured (negative indices allowed).
        image_size: teacher view size in pixels (the centre square of each image is resized to it).
        data_path: where the samples come from, recorded in the manifest.
        settings: PCA width, shard size, batch size, decoding threads, bad-sample limit.
        device: where the teacher runs.
        total: number of distinct keys in ``samples``, for the progress bar.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        TeacherCacheError: ``out_dir`` contains a build with other settings, or a finished shard contains other
            keys than the data now gives for it (the data changed between runs).
        ValueError: more than ``max_bad_fraction`` of the samples cannot be read, or no sample can.
    """
    settings = settings or CacheBuildSettings()
    out_dir = Path(out_dir)
    device = torch.device(device)
    teacher = teacher.to(device)
    build = _build_record(teacher, model_kwargs=model_kwargs, weights_fingerprint=weights_fingerprint,
                          requested_blocks=requested_blocks, image_size=image_size, data_path=data_path,
                          settings=settings)
    if _start_build(out_dir, build):
        logger.info("Teacher cache %s is already complete", out_dir)
        return json.loads((out_dir / MANIFEST_FILE).read_text())

    started = time.perf_counter()
    pca_path = out_dir / PCA_FILE
    if pca_path.is_file():
        bases = load_pca(pca_path)
        pca_images = json.loads((out_dir / BUILD_FILE).read_text()).get("pca_images")
        logger.info("Reusing the PCA basis in %s", pca_path)
    else:
        bases, pca_images = fit_pca(teacher, pca_samples, image_size=image_size, settings=settings, device=device)
        _write_file(pca_path, lambda tmp: save_pca(Path(tmp), bases))
        _write_json(out_dir / BUILD_FILE, {**build, "pca_images": pca_images})
    logger.info("PCA to %d channels keeps %s of the variance", settings.pca_dim,
                ", ".join(f"{name} {basis.explained:.1%}" for name, basis in bases.items()))
    device_bases = {name: basis.to(device) for name, basis in bases.items()}

    grid_tokens = build["grid"][0] * build["grid"][1]
    names = [CLS_NAME] + [level_name(i) for i in range(len(teacher.blocks))]
    shapes = {name: (grid_tokens, settings.pca_dim) for name in names[1:]}
    shapes[CLS_NAME] = (settings.pca_dim,)
    writer = _ShardWriter(out_dir, names=names, shapes=shapes, shard_size=settings.shard_size)
    counts = {"rows": 0, "keys": 0, "duplicates": 0, "bad": 0, "encoded": 0, "reused": 0}
    streamed: dict[int, set[str]] = {}
    seen: set[str] = set()
    progress = tqdm(total=total, desc="teacher-cache", unit="img")

    def pending() -> Iterable[tuple[int, str, ImageSource]]:
        """Yield the distinct samples still to encode; count repeats and samples of earlier shards."""
        for key, source in samples:
            counts["rows"] += 1
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            ordinal = counts["keys"]
            counts["keys"] += 1
            if writer.is_finished(ordinal):
                index = ordinal // settings.shard_size
                streamed.setdefault(index, set()).add(key)
                if ordinal % settings.shard_size == settings.shard_size - 1:
                    writer.verify(index, streamed[index])  # fail before encoding anything if the data changed
                counts["reused"] += 1
                progress.update(1)
                continue
            yield ordinal, key, source

    bad_examples: list[dict[str, str]] = []
    skipped_keys: list[str] = []
    with ThreadPoolExecutor(settings.num_threads) as pool:
        for batch in _batches(pending(), settings.batch_size):
            views = list(pool.map(lambda item: _load_view(item[2], image_size), batch))
            good = [i for i, view in enumerate(views) if isinstance(view, torch.Tensor)]
            features = _encode(teacher, [views[i] for i in good], device_bases, device) if good else {}
            row_of = {i: row for row, i in enumerate(good)}
            for i, (ordinal, key, _) in enumerate(batch):
                if i in row_of:
                    row = row_of[i]
                    writer.add(ordinal, key, {name: value[row : row + 1] for name, value in features.items()})
                    counts["encoded"] += 1
                    continue
                writer.add(ordinal, key, None, str(views[i]))
                counts["bad"] += 1
                skipped_keys.append(key)
                if len(bad_examples) < MAX_BAD_EXAMPLES:
                    bad_examples.append({"key": key, "reason": str(views[i])})
                    logger.warning("Skipped sample %s: %s", key, views[i])
            progress.update(len(batch))
            _check_bad_fraction(counts, settings.max_bad_fraction)
    progress.close()
    writer.flush()

    earlier_bad = writer.check_finished(streamed)
    counts["bad"] += len(earlier_bad)
    skipped_keys += [bad["key"] for bad in earlier_bad]
    bad_examples = (bad_examples + earlier_bad)[:MAX_BAD_EXAMPLES]
    cached = sum(record["keys"] for record in writer.records.values())
    if cached == 0:
        raise ValueError(f"none of the {counts['keys']} images in {data_path} could be read; the cache is empty")
    manifest = {
        **build,
        "pca": {
            "dim": settings.pca_dim,
            "file": PCA_FILE,
            "sha256": sha256_file(pca_path),
            "images": pca_images,
            "explained": {name: basis.explained for name, basis in bases.items()},
        },
        "data": {
            "path": data_path,
            "rows": counts["rows"],
            "keys": counts["keys"],
            "duplicates": counts["duplicates"],
            "cached": cached,
            "bad": counts["bad"],
            "bad_examples": bad_examples,
            # Every unreadable key: training accepts data rows with these keys, because its loader skips
            # their images as unreadable too.
            "skipped_keys": sorted(skipped_keys),
        },
        "shards": [writer.records[index] for index in sorted(writer.records)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(out_dir / MANIFEST_FILE, manifest)
    logger.info(
        "Teacher cache %s: %d images (%d encoded now, %d from an earlier run, %d unreadable) in %d shards, %.1f s",
        out_dir, cached, counts["encoded"], counts["reused"], counts["bad"], len(writer.records),
        time.perf_counter() - started,
    )
    return manifest


def table_samples(
    path: str | Path,
    *,
    filepath_column: str = "filepath",
    separator: str | None = None,
    exif_transpose: bool = True,
) -> list[tuple[str, Callable[[], Image.Image]]]:
    """List the ``(key, image loader)`` pairs of a CSV/TSV table, one per row, repeats included.

    The key is the image path as written in the table, as in the training batches' ``key``. Each loader reads the
    file relative to the table's folder when called, and raises ``ImageDecodeError`` for an unreadable file.
    """
    path = Path(path)
    rows = read_table(path, [filepath_column], separator=separator,
                      config_keys={filepath_column: "data.filepath_column"})
    root = path.parent
    samples = []
    for row in rows:
        key = row[filepath_column]
        samples.append((key, functools.partial(load_image, root / key, exif_transpose=exif_transpose)))
    return samples


def shard_samples(
    spec: str,
    *,
    image_keys: tuple[str, ...] = ("jpg", "png", "webp", "jpeg"),
    caption_key: str = "txt",
    exif_transpose: bool = True,
) -> Iterator[tuple[str, Callable[[], Image.Image]]]:
    """Yield the ``(key, image loader)`` pairs of WebDataset shards, shard by shard in the listed order.

    The key is the sample's ``__key__``, as in the training batches' ``key``, so keys must be unique across the
    shards (a repeat within one shard is a duplicate that training skips too). Shards are read once, without
    shuffling, with the trainer's shard reader. A sample that the reader or the loader cannot use (no image
    member, undecodable image, truncated tar) gives a loader that raises ``ImageDecodeError``.

    Args:
        spec: shard specification such as ``data/shard-{000000..000099}.tar`` (``::`` joins lists).
        image_keys: image member extensions, first match wins (``data.image_key``).
        caption_key: caption member (``data.caption_key``); the reader rejects shards without captions.
        exif_transpose: apply EXIF orientation.

    Raises:
        TeacherCacheError: a key occurs in two shards.
    """
    caption = CaptionSpec.parse(caption_key)
    urls = expand_shards(spec)
    first_shard: dict[str, int] = {}  # shard index of each key's first sample
    for shard_index, url in enumerate(urls):
        reader = ShardReader(ShardPlan([url], seed=0, num_workers=1), 0, caption)
        for item in reader:
            if reader.slot > 0:  # the endless reader moved on to this shard's next epoch
                break
            if item.key is not None and first_shard.setdefault(item.key, shard_index) != shard_index:
                raise TeacherCacheError(
                    f"sample key {item.key!r} occurs in shard {urls[first_shard[item.key]]} and again in shard "
                    f"{url}. The cache stores features by sample key, so one key would get another image's "
                    "features; give every sample of the data a unique key, for example by writing the shards "
                    "with dinorankclip data pack, which numbers the rows across all shards"
                )
            if isinstance(item, BadSample):
                if item.key is None:
                    logger.warning("Skipped part of shard %s: %s", url, item.reason)
                    continue
                yield item.key, functools.partial(_raise_decode_error, f"{url}: {item.key}: {item.reason}")
                continue
            yield item.key, functools.partial(_decode_member, item, image_keys, exif_transpose)


def _raise_decode_error(message: str) -> Image.Image:
    raise ImageDecodeError(message)


def _decode_member(record: RawRecord, image_keys: tuple[str, ...], exif_transpose: bool) -> Image.Image:
    image_key = next((key for key in image_keys if key in record.members), None)
    if image_key is None:
        found = ", ".join(sorted(record.members))
        raise ImageDecodeError(f"{record.url}: {record.key}: no image member ({'/'.join(image_keys)}); found {found}")
    return decode_image(record.members[image_key], exif_transpose=exif_transpose,
                        name=f"{record.url}:{record.key}.{image_key}")


def _check_bad_fraction(counts: Mapping[str, int], max_bad_fraction: float) -> None:
    processed = counts["encoded"] + counts["bad"]
    if processed >= MIN_SAMPLES_FOR_BAD_CHECK and counts["bad"] / processed > max_bad_fraction:
        raise ValueError(
            f"{counts['bad']} of {processed} images could not be read, more than data.max_bad_fraction="
            f"{max_bad_fraction}; fix the data or raise the limit"
        )
