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

__all__ = ["PairedViews"]


@dataclass
class PairedViews:
    """Callable turning an RGB PIL image into ``{"image": [3, S, S], "teacher_view": [3, T, T]}``.

    Args:
        image_size: trunk input size S in pixels.
        mean, std: trunk normalisation.
        teacher_size: teacher input size T in pixels; None produces no teacher view.
        train: draw a random resized crop; otherwise take the centre square.
        scale: area range of the random crop.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    teacher_size: int | None = None
    train: bool = False
    scale: tuple[float, float] = (0.9, 1.0)

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
        trunk = TF.resize(crop, [self.image_size, self.image_size], InterpolationMode.BICUBIC, antialias=True)
        views = {"image": TF.normalize(TF.to_tensor(trunk), self.mean, self.std)}
        if self.teacher_size is not None:
            teacher = TF.resize(crop, [self.teacher_size, self.teacher_size], InterpolationMode.BICUBIC, antialias=True)
            views["teacher_view"] = TF.to_tensor(teacher)
        return views
