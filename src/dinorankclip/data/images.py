"""Image decoding shared by training, evaluation and the teacher path.

Every image goes through :func:`to_rgb`, so all pipelines see the same pixels: EXIF orientation applied
(switchable), palette transparency expanded, alpha composited on a white background, 16-bit and 32-bit
grey scaled to 8 bits, CMYK and every other mode converted to RGB.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BACKGROUND", "ImageDecodeError", "decode_image", "load_image", "read_image_bytes", "to_rgb"]

logger = logging.getLogger(__name__)

# NOTE: transparent pixels are composited on white, as an image viewer shows them; open_clip's plain
# convert("RGB") instead keeps whatever colour the transparent pixels happen to store.
BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An image file that is missing, empty, truncated or not an image.

    Attributes:
        kind: ``missing_file``, ``read_error``, ``empty_image`` or ``decode_error``; the bad-sample
            counters in the training metrics are keyed by it.
    """

    def __init__(self, message: str, kind: str = "decode_error") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        # Keeps ``kind`` when the error crosses a DataLoader worker boundary.
        return type(self), (str(self), self.kind)


def to_rgb(image: Image.Image, *, exif_transpose: bool = True) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Args:
        image: an opened PIL image of any mode.
        exif_transpose: rotate/flip according to the EXIF orientation tag before anything else.

    Returns:
        An RGB image of the same (possibly transposed) size.
    """
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Scale the full numeric range of high-bit-depth grey images to 0..255 instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes, *, exif_transpose: bool = True, name: str = "<bytes>", min_size: int | None = None
) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to RGB.

    Args:
        data: the encoded file.
        exif_transpose: apply the EXIF orientation.
        name: file or sample name for error messages.
        min_size: when set, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale whose
            shorter side is still at least ``min_size`` pixels (libjpeg's DCT scaling through Pillow's
            ``Image.draft``). Other formats are decoded at full size.

    Raises:
        ImageDecodeError: empty, truncated or undecodable data.
    """
    if not data:
        raise ImageDecodeError(f"{name}: image file is empty (0 bytes)", "empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if min_size is not None and image.format == "JPEG":
                image.draft(image.mode, (min_size, min_size))
            image.load()  # forces a full decode so truncated files fail here, not in a worker later
        return to_rgb(image, exif_transpose=exif_transpose)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def load_image(path: str | Path, *, exif_transpose: bool = True, min_size: int | None = None) -> Image.Image:
    """Read and decode an image file to RGB (``min_size``: see :func:`decode_image`).

    Raises:
        ImageDecodeError: the file is missing, empty, truncated or not an image.
    """
    data = read_image_bytes(path)
    return decode_image(data, exif_transpose=exif_transpose, name=str(path), min_size=min_size)


def read_image_bytes(path: str | Path, name: str | None = None) -> bytes:
    """Read the bytes of an image file; ``name`` (default: the path) starts the error message.

    Raises:
        ImageDecodeError: the file is missing (kind ``missing_file``) or cannot be read (``read_error``).
    """
    name = str(path) if name is None else name
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: image file not found", "missing_file") from None
    except OSError as err:
        raise ImageDecodeError(f"{name}: cannot read image file ({err.strerror or err})", "read_error") from None
