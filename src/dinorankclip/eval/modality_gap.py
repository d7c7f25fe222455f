"""Four-node modality gap on held-out image-caption pairs.

The four embedding sets (nodes), one row per held-out image and its first caption:

* ``clip_image``: the trunk's image embedding z_clip;
* ``fused_image``: the fused image embedding z_img = normalize(z_clip + Δ);
* ``clip_text``: the trunk's text embedding t_clip;
* ``fused_text``: the text embedding after the text branch: t_clip plus the gated residual of the text
  branch's teacher-space projection, mapped back into the CLIP space by the model's own learned map.
  This is the node through which the student/teacher-space projection enters the shared space.

NOTE: all four nodes are compared in the CLIP space (width E) only, because a centroid gap needs one
space. The student/teacher-space sets themselves (the student image branch's global feature and the text
branch's projection, width Dt) are compared with each other in the teacher space and reported as the
separate scalar ``teacher_space_gap``. Without fusion (``fusion.variant=none``) the fused nodes equal the
CLIP nodes, and with the ``image_only`` variant ``fused_text`` equals ``clip_text``.

Every set is L2-normalised. The gap between nodes a and b is the centroid difference c_a − c_b with
c = mean of the set's unit vectors; the result contains the 4×4 matrix of its norms ||c_a − c_b||.
The 2-D plot projects the union of the four sets on its first two principal components.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.csv_dataset import collate_samples
from .captions import open_captions
from .features import Encoder, check_unreadable

__all__ = ["NODES", "collect_gap_sets", "gap_matrix", "plot_gap_pca", "run_modality_gap"]

logger = logging.getLogger(__name__)

NODES = ("clip_image", "fused_image", "clip_text", "fused_text")
_IMAGE_KEYS = {"clip_image": "clip_image_features", "fused_image": "image_features"}
_TEXT_KEYS = {"clip_text": "clip_text_features", "fused_text": "text_features"}


def collect_gap_sets(encoder: Encoder, source: str | Path, *, transform: Callable, split: str = "test",
                     image_root: str | None = None, max_pairs: int | None = None, batch_size: int = 256,
                     num_workers: int = 0, max_bad_fraction: float = 0.05,
                     ) -> tuple[dict[str, torch.Tensor], int]:
    """Embed one (image, first caption) pair per held-out image.

    Returns:
        (sets, num_images_skipped): the four nodes as [n, E] unit vectors, plus ``student_image`` and
        ``student_text`` ([n, Dt] unit vectors) when the model has a student, and the number of unreadable
        images that were left out.

    Raises:
        ValueError: more than ``max_bad_fraction`` of the images are unreadable.
    """
    data = open_captions(source, split=split, image_root=image_root, transform=transform)
    if max_pairs is not None and max_pairs < len(data):
        data = torch.utils.data.Subset(data, range(max_pairs))
        base = data.dataset
    else:
        base = data
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_samples)
    feats = encoder.images(loader, desc="modality gap",
                           keys=(*_IMAGE_KEYS.values(), "student_global"))
    check_unreadable(feats, desc=f"modality gap on {source}", max_bad_fraction=max_bad_fraction,
                     hint=base.path_hint())
    first_caption: dict[int, str] = {}
    for text, owner in zip(base.texts, base.text_to_image.tolist(), strict=True):
        first_caption.setdefault(owner, text)
    texts = [first_caption[int(i)] for i in feats["index"]]
    text_feats = encoder.texts_all(texts, batch_size=batch_size, keys=(*_TEXT_KEYS.values(), "text_student"))
    sets = {node: F.normalize(feats[key], dim=-1) for node, key in _IMAGE_KEYS.items()}
    sets.update({node: F.normalize(text_feats[key], dim=-1) for node, key in _TEXT_KEYS.items()})
    if "student_global" in feats and "text_student" in text_feats:
        sets["student_image"] = F.normalize(feats["student_global"], dim=-1)
        sets["student_text"] = F.normalize(text_feats["text_student"], dim=-1)
    return sets, feats["num_images_skipped"]


def gap_matrix(sets: dict[str, torch.Tensor], nodes=NODES) -> torch.Tensor:
    """Norms of the centroid differences, [len(nodes), len(nodes)], symmetric with a zero diagonal."""
    centroids = torch.stack([sets[node].mean(dim=0) for node in nodes])  # [4, E]
    return torch.cdist(centroids[None].double(), centroids[None].double())[0].float()


def plot_gap_pca(sets: dict[str, torch.Tensor], path: str | Path, *, title: str = "", nodes=NODES) -> Path:
    """Scatter the four nodes on the first two principal components of their union; mark the centroids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    union = torch.cat([sets[node] for node in nodes]).double()
    mean = union.mean(dim=0)
    _, _, basis = torch.pca_lowrank(union - mean, q=2, center=False)  # basis [E, 2]
    explained = ((union - mean) @ basis).var(dim=0) / (union - mean).var(dim=0).sum()
    colours = {"clip_image": "tab:blue", "fused_image": "tab:cyan", "clip_text": "tab:red", "fused_text": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6, 5))
    for node in nodes:
        points = ((sets[node].double() - mean) @ basis).numpy()
        centre = points.mean(axis=0)
        ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.35, color=colours.get(node), label=node)
        ax.scatter([centre[0]], [centre[1]], s=120, marker="X", color=colours.get(node), edgecolors="black")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(title or "Modality gap: 2-D PCA of the four embedding sets")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_modality_gap(encoder: Encoder, source: str | Path, *, transform: Callable, plot_path: str | Path | None,
                     split: str = "test", image_root: str | None = None, max_pairs: int | None = None,
                     batch_size: int = 256, num_workers: int = 0, title: str = "",
                     max_bad_fraction: float = 0.05) -> dict[str, Any]:
    """Compute the four-node gap matrix (and the plot when ``plot_path`` is given).

    Returns:
        ``nodes``, ``matrix`` (4×4 nested list of centroid gap norms), ``gaps`` (the same as
        ``"a|b": norm`` for a < b), ``centroid_norms``, ``teacher_space_gap`` (or None), ``num_pairs``,
        ``num_images_skipped`` and ``plot`` (path or None).
    """
    sets, skipped = collect_gap_sets(encoder, source, transform=transform, split=split, image_root=image_root,
                                     max_pairs=max_pairs, batch_size=batch_size, num_workers=num_workers,
                                     max_bad_fraction=max_bad_fraction)
    matrix = gap_matrix(sets)
    gaps = {f"{a}|{b}": float(matrix[i, j]) for i, a in enumerate(NODES) for j, b in enumerate(NODES) if i < j}
    teacher_gap = None
    if "student_image" in sets:
        teacher_gap = float((sets["student_image"].mean(0) - sets["student_text"].mean(0)).norm())
    plot = str(plot_gap_pca(sets, plot_path, title=title)) if plot_path is not None else None
    return {
        "nodes": list(NODES),
        "matrix": matrix.tolist(),
        "gaps": gaps,
        "centroid_norms": {node: float(sets[node].mean(0).norm()) for node in NODES},
        "teacher_space_gap": teacher_gap,
        "num_pairs": int(sets["clip_image"].shape[0]),
        "num_images_skipped": skipped,
        "source": str(source),
        "plot": plot,
    }
