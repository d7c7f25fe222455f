"""Write WebDataset shards (img2dataset layout) from a CSV/TSV table of image paths and captions.

Each sample is ``KEY.jpg`` (or ``.png``/``.webp``: the image bytes as stored, never re-encoded),
``KEY.txt`` (the caption, UTF-8) and ``KEY.json`` (key, caption, source path and, when given, the
second caption), with KEY the zero-padded table row. Every image is decoded once before it is stored (a
JPEG at 1/8 scale, which still reads the whole file), so rows that training would skip as unreadable are
left out. Shards are written to a temporary file and renamed, and ``sizes.json`` maps each shard's file
name to its sample count (the file open_clip reads).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from webdataset import TarWriter

from .csv_dataset import read_table
from .images import ImageDecodeError, decode_image, read_image_bytes

__all__ = ["PackResult", "image_extension", "pack_shards"]

logger = logging.getLogger(__name__)

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def image_extension(data: bytes, path: str) -> str:
    """Return the member extension for encoded image bytes: from the file signature, else the file suffix."""
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = Path(path).suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix or "jpg"


@dataclass
class PackResult:
    """Shards, sample counts and skipped rows written by :func:`pack_shards`."""

    shards: list[Path]
    sizes: dict[str, int]
    pattern: str  # brace pattern of all shards, for data.train
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    # Skipped rows per failure class (missing_file, read_error, empty_image, decode_error), the names of the
    # training metrics skipped_<kind>.
    skipped_kinds: Counter[str] = field(default_factory=Counter)
    removed: list[Path] = field(default_factory=list)  # shards of an earlier pack deleted by overwrite=True

    @property
    def num_samples(self) -> int:
        return sum(self.sizes.values())

    def skip(self, source: str, kind: str, reason: str) -> None:
        self.skipped.append((source, reason))
        self.skipped_kinds[kind] += 1


def _read_image(path: Path, source: str) -> bytes:
    """Return the bytes of the image file at ``path`` after checking that they decode.

    Raises:
        ImageDecodeError: the file is missing, unreadable, empty or not a decodable image.
    """
    data = read_image_bytes(path, name=source)
    # min_size=1 lets libjpeg decode a JPEG at 1/8 scale; other formats are decoded at full size.
    decode_image(data, exif_transpose=False, name=source, min_size=1)
    return data


def _is_shard_name(name: str, prefix: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}-\d+\.tar", name) is not None


def _existing_shards(out: Path, prefix: str) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(path for path in out.glob(f"{prefix}-*.tar") if _is_shard_name(path.name, prefix))


def _merged_sizes(out: Path, sizes: dict[str, int], prefix: str) -> dict[str, int]:
    """Return ``sizes`` plus the entries of an existing ``sizes.json`` for other shards that still exist."""
    try:
        old = json.loads((out / "sizes.json").read_text())
    except (OSError, ValueError):
        return dict(sizes)
    if not isinstance(old, dict):
        return dict(sizes)
    other_prefixes = {name: count for name, count in old.items()
                      if not _is_shard_name(name, prefix) and (out / name).is_file()}
    return {**other_prefixes, **sizes}


def _write_shard(path: Path, samples: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # A fixed integer mtime makes shards reproducible and lets tarfile write plain ustar headers (a float
        # mtime needs a PAX header per member, which costs time on every read).
        with TarWriter(str(tmp), mtime=0) as writer:
            for sample in samples:
                writer.write(sample)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pack_shards(
    table: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    filepath_column: str = "filepath",
    caption_column: str = "caption",
    second_caption_column: str | None = None,
    separator: str | None = None,
    overwrite: bool = False,
) -> PackResult:
    """Write the pairs of ``table`` as shards ``{out_dir}/{prefix}-NNNNNN.tar`` plus ``sizes.json``.

    Rows whose image file is missing, unreadable, empty or does not decode are skipped and listed in the
    result. Entries of an existing ``sizes.json`` for shards with another prefix are kept.

    Args:
        table: CSV/TSV with image paths (relative to the table's folder) and captions.
        out_dir: output folder (created).
        shard_size: samples per shard.
        prefix: shard file-name prefix.
        filepath_column, caption_column, second_caption_column, separator: as in the training config.
        overwrite: replace the ``{prefix}-*.tar`` shards already in ``out_dir`` and delete those beyond the
            new shard count. Without it such shards are an error, because ``sizes.json`` would not list
            the old ones and a brace pattern could mix old and new shards.

    Raises:
        ValueError: ``shard_size`` < 1, an invalid ``prefix``, a missing column, ``out_dir`` is a file, or no
            readable image at all.
        FileExistsError: ``out_dir`` already contains ``{prefix}-*.tar`` shards and ``overwrite`` is False.
    """
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size} is invalid; give at least 1 sample per shard")
    table = Path(table)
    columns = [filepath_column, caption_column] + ([second_caption_column] if second_caption_column else [])
    if not re.fullmatch(r"[\w.-]+", prefix):
        raise ValueError(f"shard prefix {prefix!r} is invalid; use letters, digits, '.', '_' and '-' only")
    flags = {filepath_column: "--filepath-column", caption_column: "--caption-column"}
    if second_caption_column:
        flags[second_caption_column] = "--second-caption-column"
    rows = read_table(table, columns, separator=separator, config_keys=flags)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is an existing file; give a folder path for the shards")
    existing = _existing_shards(out, prefix)
    if existing and not overwrite:
        names = ", ".join(path.name for path in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise FileExistsError(
            f"{out} already contains {len(existing)} shards named {prefix}-*.tar ({names}); remove them, choose "
            "another output folder or prefix, or pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    width = max(9, len(str(len(rows))))
    result = PackResult(shards=[], sizes={}, pattern="")
    pending: list[dict] = []

    def flush() -> None:
        path = out / f"{prefix}-{len(result.shards):06d}.tar"
        _write_shard(path, pending)
        result.shards.append(path)
        result.sizes[path.name] = len(pending)
        pending.clear()

    for row_number, row in enumerate(rows):
        source = row[filepath_column]
        try:
            data = _read_image(table.parent / source, source)
        except ImageDecodeError as err:
            result.skip(source, err.kind, str(err))
            continue
        key = f"{row_number:0{width}d}"
        caption = row[caption_column] or ""
        meta = {"key": key, "caption": caption, "filepath": source}
        sample = {"__key__": key, image_extension(data, source): data, "txt": caption}
        if second_caption_column:
            meta[second_caption_column] = row[second_caption_column] or ""
        sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        pending.append(sample)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not result.shards:
        raise ValueError(f"{table}: no row has a readable image; nothing was written")
    written = set(result.shards)
    result.removed = [path for path in existing if path not in written]
    for path in result.removed:
        path.unlink()
    if result.removed:
        logger.info("Removed %d shards of an earlier pack from %s (first: %s)", len(result.removed), out,
                    result.removed[0].name)
    sizes_path = out / "sizes.json"
    tmp = sizes_path.with_name(f".sizes.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_merged_sizes(out, result.sizes, prefix), indent=1) + "\n")
    os.replace(tmp, sizes_path)
    last = len(result.shards) - 1
    result.pattern = str(out / (f"{prefix}-{{000000..{last:06d}}}.tar" if last else f"{prefix}-000000.tar"))
    for _, reason in result.skipped[:10]:
        logger.warning("Skipped %s", reason)
    if len(result.skipped) > 10:
        logger.warning("%d more rows skipped", len(result.skipped) - 10)
    return result
