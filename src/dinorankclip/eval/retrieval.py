"""Image-text retrieval: R@1/5/10 both ways with several captions per image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["recall_at_k", "retrieval_chance", "retrieval_metrics"]

KS = (1, 5, 10)


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = KS
) -> dict[str, dict[str, float]]:
    """Recall at K for image-to-text and text-to-image retrieval.

    An image counts as a hit at K when any of its captions is among the K most similar texts; a text
    counts as a hit when its own image is among the K most similar images.

    Args:
        image_features: [I, E] unit vectors.
        text_features: [T, E] unit vectors.
        text_to_image: [T] index of each text's image.
    """
    sims = image_features @ text_features.T  # [I, T]
    num_images, num_texts = sims.shape
    # Image -> text: best rank among the image's captions.
    ranks_i2t = sims.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each text for each image
    own = text_to_image[None, :] == torch.arange(num_images)[:, None]  # [I, T]
    best_rank_i2t = ranks_i2t.masked_fill(~own, num_texts).amin(dim=1)  # [I]
    # Text -> image: rank of the text's own image.
    ranks_t2i = sims.T.argsort(dim=1, descending=True).argsort(dim=1)  # [T, I]
    rank_t2i = ranks_t2i.gather(1, text_to_image[:, None]).squeeze(1)
    return {
        "image_to_text": {f"R@{k}": (best_rank_i2t < k).float().mean().item() for k in ks},
        "text_to_image": {f"R@{k}": (rank_t2i < k).float().mean().item() for k in ks},
    }


def retrieval_chance(captions_per_image: Sequence[int], ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """Expected recall at K of a random ranking (the chance level) for the given caption counts.

    Image to text: 1 - C(T - c_i, K) / C(T, K), averaged over images with c_i captions out of T texts.
    Text to image: K / I.
    """
    num_images = len(captions_per_image)
    num_texts = sum(captions_per_image)

    def miss(c: int, k: int) -> float:
        if num_texts - c < k:
            return 0.0
        return math.exp(math.lgamma(num_texts - c + 1) - math.lgamma(num_texts - c - k + 1)
                        - math.lgamma(num_texts + 1) + math.lgamma(num_texts - k + 1))

    return {
        "image_to_text": {f"R@{k}": sum(1 - miss(c, k) for c in captions_per_image) / num_images for k in ks},
        "text_to_image": {f"R@{k}": min(1.0, k / num_images) for k in ks},
    }


def retrieval_metrics(image_features, text_features, text_to_image, ks: Sequence[int] = KS) -> dict:
    """Recall at K both ways, the chance levels and the counts."""
    counts = torch.bincount(text_to_image, minlength=image_features.shape[0]).tolist()
    result = recall_at_k(image_features, text_features, text_to_image, ks)
    result["chance"] = retrieval_chance(counts, ks)
    result["num_images"] = int(image_features.shape[0])
    result["num_texts"] = int(text_features.shape[0])
    return result
