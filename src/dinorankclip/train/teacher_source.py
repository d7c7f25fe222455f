"""Teacher feature sources for training: the frozen teacher run on each batch, or a feature cache.

Both sources are callables from a batch to a ``TeacherOutput`` and carry the ``TeacherGeometry`` that the
student and fusion are built for. With ``teacher.cache`` set the teacher is never built: features are read by
sample key, and the teacher space is the cache's PCA space (``geometry.dim`` is the PCA width).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..models.dinorankclip import TeacherGeometry
from ..teacher import TeacherOutput, build_teacher, teacher_input_size
from ..teacher.cache import TeacherCache, TeacherCacheError, check_cache_matches, project_output

__all__ = ["CachedTeacher", "OnlineTeacher", "build_teacher_source"]

logger = logging.getLogger(__name__)

# Keys listed in the error for training data that the cache lacks.
MAX_KEYS_IN_MESSAGE = 5


class OnlineTeacher:
    """Run the frozen DINOv3 teacher on ``batch["teacher_view"]`` at every step.

    ``teacher.cache`` is set when evaluating a model that was trained on cached features and injects teacher
    tokens. The teacher must then match the cache, and its tokens are projected with the cache's PCA, so the model
    receives the feature space it was trained on.

    Attributes:
        geometry: the teacher space's shape facts.
        needs_teacher_view: True; the source reads ``batch["teacher_view"]``.
        needs_center_crop: False; any crop works because the teacher sees the same view as the student.
    """

    needs_teacher_view = True
    needs_center_crop = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        if cfg.teacher.weights is None:
            raise FileNotFoundError(
                "teacher.weights is not set; give a local DINOv3 weights file (Meta .pth, timm .safetensors/.pth "
                "or a Hugging Face folder), teacher.cache=<folder>, or teacher.weights=random for tests"
            )
        self.pca = None
        if cfg.teacher.cache is not None:
            cache = TeacherCache(cfg.teacher.cache)
            check_cache_matches(cache.manifest, cfg.teacher, cache_dir=cache.path, seed=cfg.train.seed)
            self.pca = {name: basis.to(device) for name, basis in cache.pca.items()}
        self.teacher = build_teacher(
            cfg.teacher.name,
            cfg.teacher.weights,
            blocks=tuple(cfg.teacher.blocks),
            autocast_bf16=cfg.teacher.autocast,
            **cfg.teacher.model_kwargs,
        ).to(device)
        self.device = device
        patch = self.teacher.patch_size
        height, width = teacher_input_size(cfg.teacher.image_size, cfg.teacher.image_size, patch)
        if height != width:
            raise ValueError(f"teacher.image_size={cfg.teacher.image_size} maps to a non-square input {height}x{width}")
        self.geometry = TeacherGeometry(
            dim=self.teacher.embed_dim if self.pca is None else cache.dim,
            grid=(height // patch, width // patch),
            blocks=tuple(self.teacher.blocks),
            depth=self.teacher.num_blocks,
            image_size=height,
        )

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        output = self.teacher(batch["teacher_view"].to(self.device, non_blocking=True))
        return output if self.pca is None else project_output(output, self.pca)


class CachedTeacher:
    """Read precomputed teacher features for ``batch["key"]`` from a cache written by ``teacher-cache``.

    The teacher is never built. The cache must come from the configured teacher (name, timm arguments, weights,
    image size, blocks), and, when the training data is a table, must hold every key of it or list the key as
    unreadable when it was built.

    Attributes:
        cache: the open cache.
        geometry: the teacher space's shape facts, with ``dim`` the PCA width.
        needs_teacher_view: False; the source reads only the sample keys.
        needs_center_crop: True unless ``teacher.cache_augment``: the cached features belong to the centre
            crop, so the training views should be that crop too.
    """

    needs_teacher_view = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cache = TeacherCache(cfg.teacher.cache)
        check_cache_matches(self.cache.manifest, cfg.teacher, cache_dir=self.cache.path, seed=cfg.train.seed)
        self.device = device
        self.needs_center_crop = not cfg.teacher.cache_augment
        self.geometry = TeacherGeometry(
            dim=self.cache.dim,
            grid=self.cache.grid,
            blocks=self.cache.blocks,
            depth=self.cache.depth,
            image_size=self.cache.image_size,
        )
        if cfg.data.train is not None and Path(cfg.data.train).suffix.lower() in (".csv", ".tsv", ".tab"):
            self.check_table_keys(cfg)

    def check_table_keys(self, cfg: Config) -> None:
        """Raise unless every image key of the training table has features in the cache, before training starts.

        A key that the cache build could not read is accepted while its image still cannot be read, because the
        data loader then skips it as unreadable too (counted like any other bad sample).
        """
        from ..data.csv_dataset import read_table

        rows = read_table(cfg.data.train, [cfg.data.filepath_column], separator=cfg.data.separator)
        absent = self.cache.missing_keys(row[cfg.data.filepath_column] for row in rows)
        missing = [key for key in absent if key not in self.cache.skipped]
        if missing:
            raise TeacherCacheError(
                f"teacher cache {self.cache.path} lacks {len(missing)} image keys of data.train={cfg.data.train}: "
                f"{_listed(missing)}. The cache was built from {self.cache.manifest['data']['path']!r}; build one "
                f"for this table with dinorankclip teacher-cache --data {cfg.data.train} --out NEW_FOLDER"
            )
        skipped = [key for key in absent if key in self.cache.skipped]
        readable = [key for key in skipped if _decodes(Path(cfg.data.train).parent / key)]
        if readable:
            raise TeacherCacheError(
                f"teacher cache {self.cache.path} has no features for {len(readable)} images of "
                f"data.train={cfg.data.train} that could not be read when it was built but can be read now: "
                f"{_listed(readable)}. The images changed since the build; build a new cache with dinorankclip "
                f"teacher-cache --data {cfg.data.train} --out NEW_FOLDER"
            )
        if skipped:
            logger.info(
                "%d images of data.train could not be read when the teacher cache was built and still cannot "
                "(e.g. %r); training skips them as unreadable", len(skipped), skipped[0],
            )

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        # NOTE: the shard reads run in the training process, not in the data loader's workers.
        output = self.cache.lookup(batch["key"])
        levels = tuple(level.to(self.device, non_blocking=True) for level in output.patch_levels)
        return TeacherOutput(
            cls=output.cls.to(self.device, non_blocking=True),
            patch=levels[-1],
            patch_levels=levels,
            grid_size=output.grid_size,
        )


def _listed(keys: list[str]) -> str:
    listed = ", ".join(repr(key) for key in keys[:MAX_KEYS_IN_MESSAGE])
    return listed + (f" and {len(keys) - MAX_KEYS_IN_MESSAGE} more" if len(keys) > MAX_KEYS_IN_MESSAGE else "")


def _decodes(path: Path) -> bool:
    """Return True when the image at ``path`` decodes (a JPEG at 1/8 scale, which still reads the whole file)."""
    from ..data.images import ImageDecodeError, load_image

    try:
        load_image(path, exif_transpose=False, min_size=1)
    except ImageDecodeError:
        return False
    return True


def build_teacher_source(
    cfg: Config, device: torch.device
) -> tuple[OnlineTeacher | CachedTeacher | None, TeacherGeometry | None]:
    """Return the teacher feature source and the teacher geometry, or (None, None) without injection."""
    if not cfg.needs_teacher:
        return None, None
    if cfg.teacher.cache is not None:
        source: OnlineTeacher | CachedTeacher = CachedTeacher(cfg, device)
        logger.info(
            "Teacher features from the cache %s (%d images): PCA width %d, grid %s, blocks %s; the teacher is not "
            "built", source.cache.path, len(source.cache), source.geometry.dim, source.geometry.grid,
            source.geometry.blocks,
        )
        if cfg.data.augment and source.needs_center_crop:
            logger.warning(
                "teacher.cache is set, so training views are the centre crop that the cached features were "
                "computed on, and data.augment's random crops are off; set teacher.cache_augment=true to keep them "
                "(the student then sees a different crop from its targets)"
            )
        return source, source.geometry
    source = OnlineTeacher(cfg, device)
    logger.info("Teacher %s online: width %d, grid %s, blocks %s", cfg.teacher.name, source.geometry.dim,
                source.geometry.grid, source.geometry.blocks)
    return source, source.geometry
