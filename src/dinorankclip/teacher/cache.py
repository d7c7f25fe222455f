"""Teacher feature cache: its on-disk format, the identity check against a config, and the reader.

A cache folder contains

- ``manifest.json``: what made the features (timm teacher name and arguments, a fingerprint of the weights,
  image size, blocks, patch grid), the PCA width, data counts, the keys of the images that could not be read
  (``data.skipped_keys``) and the list of shards. It is written last, so a folder without it is an unfinished
  build;
- ``pca.safetensors``: for the CLS token and for each block, the PCA mean ``[D]`` and components ``[W, D]``
  (float32), fitted on the teacher's tokens of a sample of the images;
- ``shard-NNNNNN.safetensors``: float16 PCA coordinates of up to ``shard_size`` images, ``cls`` ``[n, W]`` and
  ``level_j`` ``[n, P, W]`` (block j of the selected blocks, shallowest first), with the sample keys and the
  unreadable samples' keys and reasons in the file metadata;
- ``build.json``: the settings of the build, written first, so a restart can check that it continues the same
  build.

Features belong to the evaluation crop: the centre square of each image, resized to the teacher's input size.
Training with random crops therefore pairs a student view with targets of a slightly different crop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from dinorankclip.teacher.dinov3 import TeacherOutput, resolve_blocks

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "PcaBasis",
    "TeacherCache",
    "TeacherCacheError",
    "check_cache_matches",
    "level_name",
    "load_pca",
    "project_output",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "dinorankclip-teacher-cache"
CACHE_VERSION = 1
MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
PCA_FILE = "pca.safetensors"
CLS_NAME = "cls"
RANDOM_WEIGHTS = "random"
# Files that hold weights inside a Hugging Face model folder; config.json describes the architecture, which the
# teacher name and arguments already record.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, unfinished, made for another teacher, or lacks a requested sample."""


def level_name(index: int) -> str:
    """Name of the tensor holding the ``index``-th selected block (shallowest first) in shards and the PCA file."""
    return f"level_{index}"


def shard_file_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(weights: str | os.PathLike[str], *, random_seed: int | None = None) -> dict[str, Any]:
    """Identify teacher weights: the SHA-256 of the file, or of a folder's weight files, or ``random`` and a seed.

    Args:
        weights: a weights file, a Hugging Face folder, or ``"random"``.
        random_seed: the torch seed the random teacher was initialised with (random weights only).

    Returns:
        ``{"kind": "file" | "folder", "sha256": ...}`` or ``{"kind": "random", "seed": ...}``.

    Raises:
        FileNotFoundError: ``weights`` is neither ``"random"`` nor an existing path, or a folder contains no
            weight files.
    """
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        return {"kind": RANDOM_WEIGHTS, "seed": random_seed}
    path = Path(weights).expanduser()
    if path.is_file():
        return {"kind": "file", "sha256": sha256_file(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"teacher weights folder {path} contains no weight files ({WEIGHT_FILE_SUFFIXES})")
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
        return {"kind": "folder", "sha256": digest.hexdigest()}
    raise FileNotFoundError(f"teacher weights not found: {path}")


def _describe_weights(fingerprint: Mapping[str, Any]) -> str:
    if fingerprint.get("kind") == RANDOM_WEIGHTS:
        return f"random weights (seed {fingerprint.get('seed')})"
    return f"{fingerprint.get('kind')} with SHA-256 {str(fingerprint.get('sha256'))[:16]}..."


def check_cache_matches(
    manifest: Mapping[str, Any], teacher_cfg: Any, *, cache_dir: str | Path, seed: int | None = None
) -> None:
    """Raise unless the cache was made by the teacher that ``teacher_cfg`` describes.

    Compared: timm name, timm arguments, weights (by SHA-256; ``teacher.weights=null`` accepts the cache's
    weights, and ``random`` matches a cache of random weights whatever its seed, with a warning when the seed
    differs from ``seed``), image size and the resolved blocks.

    Args:
        manifest: the cache manifest.
        teacher_cfg: a ``TeacherConfig`` (``name``, ``model_kwargs``, ``weights``, ``image_size``, ``blocks``).
        cache_dir: the cache folder, for the message.
        seed: the seed a random teacher of this run is initialised with (``train.seed``), or None.

    Raises:
        TeacherCacheError: listing every setting that differs, with the cache's and the config's value.
    """
    teacher = manifest["teacher"]
    problems = []
    if teacher_cfg.name != teacher["name"]:
        problems.append(f"teacher.name: cache {teacher['name']!r}, config {teacher_cfg.name!r}")
    if dict(teacher_cfg.model_kwargs) != teacher["model_kwargs"]:
        problems.append(
            f"teacher.model_kwargs: cache {teacher['model_kwargs']}, config {dict(teacher_cfg.model_kwargs)}"
        )
    if teacher_cfg.image_size != manifest["image_size"]:
        problems.append(f"teacher.image_size: cache {manifest['image_size']}, config {teacher_cfg.image_size}")
    try:
        blocks = list(resolve_blocks(list(teacher_cfg.blocks), teacher["depth"]))
    except ValueError as error:
        blocks = None
        problems.append(
            f"teacher.blocks: config {list(teacher_cfg.blocks)} is invalid for the cache's teacher ({error})"
        )
    if blocks is not None and blocks != manifest["blocks"]:
        problems.append(
            f"teacher.blocks: cache {manifest['requested_blocks']} (blocks {manifest['blocks']}), "
            f"config {list(teacher_cfg.blocks)} (blocks {blocks})"
        )
    cached = teacher["weights_fingerprint"]
    if teacher_cfg.weights is not None:
        if teacher_cfg.weights == RANDOM_WEIGHTS:
            if cached["kind"] != RANDOM_WEIGHTS:
                problems.append(f"teacher.weights: cache {_describe_weights(cached)}, config 'random'")
            elif seed is not None and cached.get("seed") is not None and cached["seed"] != seed:
                logger.warning(
                    "teacher cache %s contains features of a random teacher with seed %s, but this run's random "
                    "teacher uses train.seed=%s, so any teacher built here (online PCA, evaluation with "
                    "fusion.injection_source=teacher) differs from the cached one. Rebuild the cache with "
                    "--seed %s to match", cache_dir, cached["seed"], seed, seed,
                )
        elif cached["kind"] == RANDOM_WEIGHTS:
            problems.append(f"teacher.weights: cache {_describe_weights(cached)}, config {teacher_cfg.weights!r}")
        else:
            current = weights_fingerprint(teacher_cfg.weights)
            if current.get("sha256") != cached.get("sha256"):
                problems.append(
                    f"teacher.weights: cache made from {teacher['weights']!r} ({_describe_weights(cached)}), "
                    f"config {teacher_cfg.weights!r} ({_describe_weights(current)})"
                )
    if problems:
        raise TeacherCacheError(
            f"teacher cache {cache_dir} was made with different teacher settings: " + "; ".join(problems)
            + ". Rebuild it with dinorankclip teacher-cache, or make the config match the cache"
        )


@dataclass
class PcaBasis:
    """A PCA projection ``x -> (x - mean) @ components.T`` from width D to width W.

    Attributes:
        mean: ``[D]`` mean of the fitted tokens.
        components: ``[W, D]`` orthonormal principal directions, largest variance first.
        explained: fraction of the fitted tokens' variance that the W components keep.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained: float = float("nan")

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Project ``[..., D]`` tokens to ``[..., W]`` PCA coordinates (float32, on the tokens' device)."""
        mean = self.mean.to(tokens.device)
        components = self.components.to(tokens.device)
        return (tokens.float() - mean) @ components.T

    def to(self, device: torch.device | str) -> PcaBasis:
        return PcaBasis(self.mean.to(device), self.components.to(device), self.explained)


def save_pca(path: Path, bases: Mapping[str, PcaBasis]) -> None:
    """Write PCA bases to a safetensors file (``NAME.mean``, ``NAME.components``; explained variance in metadata)."""
    tensors = {}
    for name, basis in bases.items():
        tensors[f"{name}.mean"] = basis.mean.float().contiguous().cpu()
        tensors[f"{name}.components"] = basis.components.float().contiguous().cpu()
    explained = json.dumps({name: basis.explained for name, basis in bases.items()})
    safetensors.torch.save_file(tensors, str(path), metadata={"explained": explained})


def load_pca(path: str | Path) -> dict[str, PcaBasis]:
    """Read the PCA bases written by :func:`save_pca`, keyed by ``cls`` and ``level_j``."""
    path = Path(path)
    tensors = safetensors.torch.load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as handle:
        explained = json.loads((handle.metadata() or {}).get("explained", "{}"))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {
        name: PcaBasis(tensors[f"{name}.mean"], tensors[f"{name}.components"], float(explained.get(name, "nan")))
        for name in names
    }


def project_output(output: TeacherOutput, bases: Mapping[str, PcaBasis]) -> TeacherOutput:
    """Project a teacher output to PCA coordinates with the cache's bases (as cached features are made)."""
    levels = tuple(bases[level_name(i)].project(level) for i, level in enumerate(output.patch_levels))
    return TeacherOutput(
        cls=bases[CLS_NAME].project(output.cls), patch=levels[-1], patch_levels=levels, grid_size=output.grid_size
    )


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a finished cache.

    Raises:
        TeacherCacheError: the folder does not exist, the build is unfinished, or the file is not a cache manifest
            of this version.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise TeacherCacheError(
            f"teacher cache folder {cache_dir} does not exist; build it with "
            f"dinorankclip teacher-cache --data <table> --out {cache_dir}"
        )
    manifest_path = cache_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        if (cache_dir / BUILD_FILE).is_file():
            raise TeacherCacheError(
                f"teacher cache {cache_dir} is unfinished (no {MANIFEST_FILE}); run the same "
                "dinorankclip teacher-cache command again to complete it"
            )
        raise TeacherCacheError(f"{cache_dir} is not a teacher cache: {MANIFEST_FILE} not found")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise TeacherCacheError(
            f"{manifest_path} is not a version-{CACHE_VERSION} teacher cache manifest (format "
            f"{manifest.get('format')!r}, version {manifest.get('version')!r}); rebuild the cache"
        )
    return manifest


class TeacherCache:
    """Read-only access to a finished teacher feature cache.

    Shards are memory-mapped when first needed and rows are read one sample at a time, so a lookup reads only the
    requested samples from disk.

    Args:
        cache_dir: the cache folder written by ``dinorankclip teacher-cache``.

    Attributes:
        manifest: the parsed ``manifest.json``.
        skipped: reason by key of the images the build could not read, which have no features.
        dim: PCA width W of every cached token.
        grid: patch grid (h, w).
        blocks: resolved teacher block indices, one cached level each.
        depth: number of blocks in the teacher.
        image_size: teacher input size in pixels.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.path = Path(cache_dir)
        self.manifest = read_manifest(self.path)
        self.dim: int = int(self.manifest["pca"]["dim"])
        self.grid: tuple[int, int] = tuple(int(v) for v in self.manifest["grid"])
        self.blocks: tuple[int, ...] = tuple(int(b) for b in self.manifest["blocks"])
        self.depth: int = int(self.manifest["teacher"]["depth"])
        self.image_size: int = int(self.manifest["image_size"])
        self._files = [self.path / shard["file"] for shard in self.manifest["shards"]]
        self._index: dict[str, tuple[int, int]] = {}
        reasons: dict[str, str] = {}
        for shard_index, file in enumerate(self._files):
            if not file.is_file():
                raise TeacherCacheError(
                    f"teacher cache {self.path}: shard {file.name} listed in the manifest is missing"
                )
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata()
            for row, key in enumerate(json.loads(metadata["keys"])):
                self._index[key] = (shard_index, row)
            for bad in json.loads(metadata.get("bad", "[]")):
                reasons[bad["key"]] = bad["reason"]
        # Manifests written before data.skipped_keys existed: the shards list the same keys.
        listed = self.manifest["data"].get("skipped_keys", list(reasons))
        self.skipped: dict[str, str] = {key: reasons.get(key, "unreadable") for key in listed}
        self._handles: dict[int, Any] = {}
        self._pca: dict[str, PcaBasis] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def pca(self) -> dict[str, PcaBasis]:
        """PCA bases keyed by ``cls`` and ``level_j`` (loaded on first use)."""
        if self._pca is None:
            self._pca = load_pca(self.path / PCA_FILE)
        return self._pca

    def missing_keys(self, keys: Iterable[str]) -> list[str]:
        """Return the distinct keys of ``keys`` that the cache lacks, in first-seen order."""
        return list(dict.fromkeys(key for key in keys if key not in self._index))

    def _handle(self, shard_index: int) -> Any:
        handle = self._handles.get(shard_index)
        if handle is None:
            handle = safe_open(str(self._files[shard_index]), framework="pt")
            self._handles[shard_index] = handle
        return handle

    def _missing_key_error(self, key: str) -> TeacherCacheError:
        data = self.manifest["data"]
        if key in self.skipped:
            return TeacherCacheError(
                f"sample key {key!r} has no features in the teacher cache {self.path}: its image could not be "
                f"read when the cache was built ({self.skipped[key]}), but training has just read it, so the "
                "image changed since. Build a new cache for this data with dinorankclip teacher-cache into a new "
                "--out folder"
            )
        return TeacherCacheError(
            f"sample key {key!r} is not in the teacher cache {self.path}, which contains {len(self)} keys from "
            f"{data['path']!r}. Keys are image paths as written in the data table; build a cache for this data "
            "with dinorankclip teacher-cache into a new --out folder"
        )

    def lookup(self, keys: Sequence[str]) -> TeacherOutput:
        """Read the cached features of ``keys``.

        Args:
            keys: B sample keys (image paths as written in the data table, or WebDataset ``__key__`` values).

        Returns:
            A float32 ``TeacherOutput`` on the CPU: ``cls`` ``[B, W]`` and ``patch_levels`` of ``[B, P, W]``.

        Raises:
            TeacherCacheError: a key is not in the cache (the message names it).
        """
        locations = []
        for key in keys:
            location = self._index.get(key)
            if location is None:
                raise self._missing_key_error(key)
            locations.append(location)
        names = [CLS_NAME] + [level_name(i) for i in range(len(self.blocks))]
        tensors = []
        for name in names:
            rows = [self._handle(shard).get_slice(name)[row : row + 1] for shard, row in locations]
            tensors.append(torch.cat(rows).float())
        levels = tuple(tensors[1:])
        return TeacherOutput(cls=tensors[0], patch=levels[-1], patch_levels=levels, grid_size=self.grid)
