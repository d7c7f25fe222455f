"""Paired views: the trunk's view and the teacher's view come from one decoded image and one crop.

In training a random resized crop (scale 0.9 to 1.0, as open_clip) is drawn once per image; the same
crop box is resized to the trunk's input size (normalised with the trunk's mean and std) and to the
teacher's input size (left in [0, 1]: the teacher and the student normalise it themselves). In evaluation
both views take the centre square of the image, as open_clip's evaluation transform does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["PairedViews", "normalize_images"]


def normalize_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Turn uint8 images [B, 3, H, W] into float32, scaled to [0, 1] and normalised with ``mean``, ``std``.

    Gives exactly the values of ``PairedViews(output_uint8=False)``, which applies the same operations
    to each image.
    """
    out = images.float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    return out.sub_(mean_t).div_(std_t)


@dataclass
class PairedViews:
    """Callable turning an RGB PIL image into ``{"image": [3, S, S], "teacher_view": [3, T, T]}``.

    Args:
        image_size: trunk input size S in pixels.
        mean, std: trunk normalisation.
        teacher_size: teacher input size T in pixels; None produces no teacher view.
        train: draw a random resized crop; otherwise take the centre square.
        scale: area range of the random crop.
        output_uint8: return both views as uint8 [3, H, W] without normalisation. The trainer
            normalises whole batches on the device with :func:`normalize_images`, and uint8 batches
            are a quarter of the size to pass between processes.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    teacher_size: int | None = None
    train: bool = False
    scale: tuple[float, float] = (0.9, 1.0)
    output_uint8: bool = False

    @property
    def decode_size(self) -> int:
        """Smallest image side that still gives every crop at least the output resolution.

        A random crop has area at least ``scale[0]`` of the image and aspect ratio at most 4/3, so its
        shorter side is at least sqrt(scale[0] * 3/4) of the image's shorter side. A centre crop
        keeps the whole shorter side. Decoders may reduce large images to this size (JPEG draft).
        """
        out = max(self.image_size, self.teacher_size or 0)
        if not self.train:
            return out
        return math.ceil(out / math.sqrt(self.scale[0] * 3 / 4))

    def crop_box(self, image: Image.Image, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """Return (top, left, height, width) of the crop shared by both views.

        The random crop follows torchvision's ``RandomResizedCrop.get_params`` (aspect ratio 3/4 to 4/3,
        ten tries, then a centre crop) but draws from ``generator``, so a crop depends only on the
        sample's seed and not on which worker process decodes it.
        """
        width, height = image.size
        if self.train:
            area = height * width
            log_ratio = (math.log(3 / 4), math.log(4 / 3))
            for _ in range(10):
                draws = torch.rand(4, generator=generator).tolist()
                target_area = area * (self.scale[0] + draws[0] * (self.scale[1] - self.scale[0]))
                aspect = math.exp(log_ratio[0] + draws[1] * (log_ratio[1] - log_ratio[0]))
                w = int(round(math.sqrt(target_area * aspect)))
                h = int(round(math.sqrt(target_area / aspect)))
                if 0 < w <= width and 0 < h <= height:
                    top = int(draws[2] * (height - h + 1))
                    left = int(draws[3] * (width - w + 1))
                    return top, left, h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        top, left, height, width = self.crop_box(image, generator)
        crop = image.crop((left, top, left + width, top + height))
        if self.output_uint8:
            # TF.resize on a PIL image calls PIL's resize, so these pixels equal the float path's.
            views = {"image": TF.pil_to_tensor(crop.resize((self.image_size,) * 2, Image.BICUBIC))}
            if self.teacher_size is not None:
                views["teacher_view"] = TF.pil_to_tensor(crop.resize((self.teacher_size,) * 2, Image.BICUBIC))
            return views
        trunk = TF.resize(crop, [self.image_size, self.image_size], InterpolationMode.BICUBIC, antialias=True)
        views = {"image": TF.normalize(TF.to_tensor(trunk), self.mean, self.std)}
        if self.teacher_size is not None:
            teacher = TF.resize(crop, [self.teacher_size, self.teacher_size], InterpolationMode.BICUBIC, antialias=True)
            views["teacher_view"] = TF.to_tensor(teacher)
        return views
