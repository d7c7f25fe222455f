"""Distillation from the frozen DINOv3 teacher into the dual-branch student, and the gate penalty.

The teacher side never receives gradients: every function detaches it.

Normalisation (all four terms are batch-size invariant):

- ``gram_loss``: mean over images, levels and the P×P entries of the squared difference of the
  token Gram matrices (cosine similarities, so entries lie in [-1, 1]).
- ``relational_loss``: mean over ordered pairs i ≠ j of the Huber difference of the pairwise
  distances between L2-normalised global features (distances lie in [0, 2]).
- ``text_align_loss``: mean over pairs of 1 - cos(text branch, teacher global feature of the image).
- ``gate_l1``: mean absolute gate value of each gate, summed over the gates present.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gate_l1", "gram_loss", "relational_loss", "text_align_loss"]


def _upcast(tensor: Tensor) -> Tensor:
    """Return ``tensor`` as float32, or unchanged when it is float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _token_gram(tokens: Tensor) -> Tensor:
    tokens = F.normalize(_upcast(tokens), dim=-1)
    return tokens @ tokens.transpose(1, 2)  # [B, P, P]


def gram_loss(student_levels: Sequence[Tensor], teacher_levels: Sequence[Tensor]) -> Tensor:
    """Compute the Gram-matrix distillation loss between student and teacher patch tokens.

    For every level, both token sets are L2-normalised per token, and their P×P cosine-similarity
    matrices are compared by mean squared error. The result is averaged over levels.

    Args:
        student_levels: S tensors [B, P, Dt], student patch tokens projected to the teacher width.
        teacher_levels: S tensors [B, P, Dt], teacher patch tokens of the matching blocks.

    Returns:
        Scalar loss.
    """
    if len(student_levels) != len(teacher_levels) or not student_levels:
        raise ValueError(
            f"gram_loss needs the same non-zero number of student and teacher levels, got "
            f"{len(student_levels)} and {len(teacher_levels)}"
        )
    losses = []
    for level, (student, teacher) in enumerate(zip(student_levels, teacher_levels, strict=True)):
        if student.ndim != 3 or student.shape[:2] != teacher.shape[:2]:
            raise ValueError(
                f"gram_loss level {level}: student tokens {tuple(student.shape)} and teacher tokens "
                f"{tuple(teacher.shape)} must both be [B, P, D] with the same B and P (same patch grid)"
            )
        losses.append(F.mse_loss(_token_gram(student), _token_gram(teacher.detach())))
    return torch.stack(losses).mean()


def _pair_distances(rows: Tensor, cols: Tensor) -> Tensor:
    rows = F.normalize(_upcast(rows), dim=-1)
    cols = F.normalize(_upcast(cols), dim=-1).to(rows.dtype)
    # Clamping keeps the square root's gradient finite for identical features.
    return (2.0 - 2.0 * rows @ cols.T).clamp_min(1e-8).sqrt()


def relational_loss(
    student_global: Tensor,
    teacher_global: Tensor,
    *,
    all_student_global: Tensor | None = None,
    all_teacher_global: Tensor | None = None,
    row_offset: int = 0,
    delta: float = 0.1,
) -> Tensor:
    """Compute the relational distance loss between student and teacher global features.

    Pairwise distances of L2-normalised features across the batch are compared with a Huber loss
    (threshold ``delta``). The pairs (i, i) are excluded.

    Args:
        student_global: [B, Dt] student global features (this rank's rows).
        teacher_global: [B, Dt] teacher global features of the same images.
        all_student_global: [N, Dt] all ranks' student features (None in a single process).
        all_teacher_global: [N, Dt] all ranks' teacher features (None in a single process).
        row_offset: global index of this rank's first row.
        delta: Huber threshold, in distance units.

    Returns:
        Scalar loss.
    """
    if student_global.ndim != 2 or student_global.shape[0] != teacher_global.shape[0]:
        raise ValueError(
            f"student_global {tuple(student_global.shape)} and teacher_global {tuple(teacher_global.shape)} "
            "must be [B, D] with the same B"
        )
    student_cols = student_global if all_student_global is None else all_student_global
    teacher_cols = teacher_global if all_teacher_global is None else all_teacher_global
    num_rows, num_cols = student_global.shape[0], student_cols.shape[0]
    if num_cols < 2:
        return 0.0 * _upcast(student_global).sum()
    dist_student = _pair_distances(student_global, student_cols)  # [B, N]
    with torch.no_grad():
        dist_teacher = _pair_distances(teacher_global, teacher_cols)
    per_pair = F.huber_loss(dist_student, dist_teacher, reduction="none", delta=delta)
    rows = torch.arange(num_rows, device=per_pair.device)
    per_pair = per_pair.index_put((rows, rows + row_offset), per_pair.new_zeros(()))
    return (per_pair.sum(1) / (num_cols - 1)).mean()


def text_align_loss(text_student: Tensor, teacher_global: Tensor) -> Tensor:
    """Compute 1 - cos between the student's text branch and the teacher's feature of the paired image.

    Args:
        text_student: [B, Dt] text-branch projection of the CLIP text embedding.
        teacher_global: [B, Dt] teacher global (CLS) feature of the paired image.

    Returns:
        Scalar loss in [0, 2].
    """
    if text_student.shape != teacher_global.shape:
        raise ValueError(
            f"text_student {tuple(text_student.shape)} and teacher_global {tuple(teacher_global.shape)} "
            "must have the same shape [B, Dt]"
        )
    cos = F.cosine_similarity(_upcast(text_student), _upcast(teacher_global.detach()), dim=-1)
    return (1.0 - cos).mean()


def gate_l1(*gates: Tensor | None) -> Tensor | None:
    """Return the sum over the given gates of their mean absolute value (None when no gate is given)."""
    present = [g for g in gates if g is not None]
    if not present:
        return None
    return torch.stack([_upcast(g).abs().mean() for g in present]).sum()
