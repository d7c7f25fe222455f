"""Contrastive losses: CLIP's symmetric InfoNCE, CyCLIP's cyclic terms and ALIP's adaptive weighting.

Notation: B local pairs, N global pairs (N = B in a single process), L2-normalised image features u and
text features v, logit scale s (already exponentiated). C = s·U Vᵀ has image rows and text columns.

Distributed form: every function takes this rank's rows (``image_features``, ``text_features``) and,
optionally, the all-gathered features of every rank (``all_image_features``, ``all_text_features``)
together with ``row_offset``, the global index of this rank's first row. Each loss is a mean over the
local rows of a per-row quantity. So when every rank has the same number of rows, the mean of the
per-rank losses is the loss of the whole global batch, and DistributedDataParallel's averaged
gradient is its gradient.

Normalisation:

- ``clip_loss``: mean cross-entropy over rows. Batch-size invariant as an average; at chance its value
  is log N.
- ``cyclip_loss``: the original CyCLIP normalisation, (1/N)·Σ_jk over all N² pairs, so each term is a
  per-row sum over N columns and grows linearly with N by design.
- ``AlipLoss``: mean of sample- and pair-weighted cross-entropies over rows, batch-size invariant like
  CLIP. The image-text and image-caption losses are added, as in ALIP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AlipLoss",
    "check_alip_columns",
    "clip_loss",
    "cyclic_terms",
    "cyclip_loss",
    "infonce",
    "pair_logits",
]


def _columns(
    image_features: Tensor,
    text_features: Tensor,
    all_image_features: Tensor | None,
    all_text_features: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Return the global column features, defaulting to the local rows in a single process."""
    if (all_image_features is None) != (all_text_features is None):
        raise ValueError("all_image_features and all_text_features must be given together or not at all")
    if all_image_features is None:
        return image_features, text_features
    return all_image_features, all_text_features


def _upcast(tensor: Tensor) -> Tensor:
    """Return ``tensor`` as float32, or unchanged when it is float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_pair(image_features: Tensor, text_features: Tensor, other: str = "text_features") -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and {other} must both be [B, E] with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("image_features and text_features are empty (batch size 0); a contrastive loss needs pairs")
    for name, tensor in (("image_features", image_features), (other, text_features)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if image_features.dtype != text_features.dtype and not torch.is_autocast_enabled(image_features.device.type):
        raise ValueError(
            f"image_features is {image_features.dtype} but {other} is {text_features.dtype}. Cast both to one "
            "dtype (e.g. .float()) or run the loss under torch.autocast"
        )


def _check_scale(logit_scale: Tensor | float) -> None:
    """Reject a logit scale that is not one positive finite number.

    The value is read only for Python numbers and CPU tensors, so a CUDA scale costs no device sync.
    """
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got a tensor of shape {tuple(logit_scale.shape)}")
        if logit_scale.device.type != "cpu":
            return
        value = float(logit_scale.detach())
    else:
        value = float(logit_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"logit_scale must be a positive finite number (the exponentiated temperature, e.g. "
            f"model.logit_scale.exp()), got {value}"
        )


def pair_logits(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Return (logits_per_image, logits_per_text), each [B, N]: this rank's rows of C and of Cᵀ.

    In a single process logits_per_text is the transpose view of logits_per_image, so the
    similarity matrix is computed once.
    """
    _check_pair(image_features, text_features)
    _check_scale(logit_scale)
    if all_image_features is None and all_text_features is None:
        logits_per_image = logit_scale * image_features @ text_features.T
        return logits_per_image, logits_per_image.T
    img_cols, txt_cols = _columns(image_features, text_features, all_image_features, all_text_features)
    return logit_scale * image_features @ txt_cols.T, logit_scale * text_features @ img_cols.T


class _RowCrossEntropy(torch.autograd.Function):
    """Mean over rows of logsumexp(row) - row[target], with a one-buffer backward (softmax - one-hot).

    ``F.cross_entropy`` keeps a B×N log-softmax for its backward pass, and autograd of the indexed
    form allocates a B×N buffer for the index as well. This function keeps only the logits, which
    callers keep anyway, and the B row log-normalisers.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        lse = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, targets[:, None])[:, 0]
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        weight = grad / logits.shape[0]
        grad_logits = torch.exp(logits - lse[:, None]).mul_(weight)
        grad_logits.scatter_add_(1, targets[:, None], (-weight).expand(logits.shape[0], 1).to(logits.dtype))
        return grad_logits, None


def infonce(logits_per_image: Tensor, logits_per_text: Tensor, row_offset: int = 0) -> Tensor:
    """Compute ½[CE(logits_per_image) + CE(logits_per_text)] with target column row_offset + i for row i.

    Args:
        logits_per_image: [B, N] image rows over all texts.
        logits_per_text: [B, N] text rows over all images.
        row_offset: global index of this rank's first row.
    """
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + row_offset
    image_ce = _RowCrossEntropy.apply(_upcast(logits_per_image), targets)
    text_ce = _RowCrossEntropy.apply(_upcast(logits_per_text), targets)
    return 0.5 * (image_ce + text_ce)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    row_offset: int = 0,
) -> Tensor:
    """Compute CLIP's symmetric InfoNCE loss, ½[CE(C) + CE(Cᵀ)] with targets on the diagonal.

    Reference loop (single process)::

        loss = 0
        for i in range(N):
            loss += -log_softmax(s * u[i] @ V.T)[i] - log_softmax(s * v[i] @ U.T)[i]
        loss /= 2 * N

    Args:
        image_features: [B, E] L2-normalised image embeddings (this rank's rows).
        text_features: [B, E] L2-normalised text embeddings (this rank's rows).
        logit_scale: scalar, already exponentiated.
        all_image_features: [N, E] image embeddings of every rank, or None in a single process.
        all_text_features: [N, E] text embeddings of every rank, or None in a single process.
        row_offset: global index of this rank's first row.

    Returns:
        Scalar loss, float32 (float64 when the features are float64).
    """
    logits = pair_logits(
        image_features,
        text_features,
        logit_scale,
        all_image_features=all_image_features,
        all_text_features=all_text_features,
    )
    return infonce(*logits, row_offset)


def cyclic_terms(
    image_features: Tensor,
    text_features: Tensor,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Compute CyCLIP's in-modal and cross-modal cyclic consistency terms.

    In-modal: (1/N)·Σ_jk (u_j·u_k - v_j·v_k)². Cross-modal: (1/N)·Σ_jk (u_j·v_k - u_k·v_j)². Each is
    a sum over N² pairs divided by N, as in the original, so it grows linearly with N. The terms do
    not depend on the logit scale (the original multiplies the similarities by s and divides the
    squares by s²).

    Args:
        image_features: [B, E] L2-normalised image features (this rank's rows).
        text_features: [B, E] L2-normalised text features (this rank's rows).
        all_image_features: [N, E] all ranks' image features (None in a single process).
        all_text_features: [N, E] all ranks' text features (None in a single process).

    Returns:
        (in_modal, cross_modal), scalars: the mean over local rows of each row's sum over N columns.
    """
    _check_pair(image_features, text_features)
    img_cols, txt_cols = _columns(image_features, text_features, all_image_features, all_text_features)
    img = _upcast(image_features)
    txt = text_features.to(img.dtype)
    img_cols, txt_cols = img_cols.to(img.dtype), txt_cols.to(img.dtype)
    in_modal = (img @ img_cols.T - txt @ txt_cols.T).square().sum(1).mean()
    cross_modal = (img @ txt_cols.T - txt @ img_cols.T).square().sum(1).mean()
    return in_modal, cross_modal


def cyclip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    in_modal_weight: float = 0.25,
    cross_modal_weight: float = 0.25,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    row_offset: int = 0,
) -> Tensor:
    """Compute the CyCLIP loss: CLIP + λ1·in-modal + λ2·cross-modal cyclic terms (λ1 = λ2 = 0.25).

    Args:
        image_features: [B, E] L2-normalised image features (this rank's rows).
        text_features: [B, E] L2-normalised text features (this rank's rows).
        logit_scale: scalar, already exponentiated.
        in_modal_weight: λ1.
        cross_modal_weight: λ2.
        all_image_features: [N, E] all ranks' image features (None in a single process).
        all_text_features: [N, E] all ranks' text features (None in a single process).
        row_offset: global index of this rank's first row.

    Returns:
        Scalar loss.
    """
    gathered = {"all_image_features": all_image_features, "all_text_features": all_text_features}
    contrastive = clip_loss(image_features, text_features, logit_scale, row_offset=row_offset, **gathered)
    in_modal, cross_modal = cyclic_terms(image_features, text_features, **gathered)
    return contrastive + in_modal_weight * in_modal + cross_modal_weight * cross_modal


def check_alip_columns(columns: Sequence[str], column_name: str | None) -> None:
    """Raise ValueError unless the training data has ALIP's second-caption column.

    Args:
        columns: column names of the training data.
        column_name: the configured second-caption column (``data.second_caption_column``).
    """
    if not column_name:
        raise ValueError(
            "loss.name='alip' needs a second caption per image, but data.second_caption_column is not set; "
            "set it to the name of the column that contains the second (synthetic) captions"
        )
    if column_name not in columns:
        raise ValueError(
            f"loss.name='alip' needs a second caption per image in column {column_name!r} "
            f"(data.second_caption_column), but the training data has only the columns {list(columns)}; "
            "add that column to the data or set data.second_caption_column to the column that contains them"
        )


class AlipLoss(nn.Module):
    """ALIP's adaptive contrastive loss over raw texts and second (synthetic) captions.

    Three similarities per sample, each compared with a running average (EMA with momentum ``ema``,
    started at 1 as in ALIP's reference code, updated in training mode before the weights are taken):
    text·caption gives the sample weight w_s = min(exp(t·c - m_tc)², 1); image·text and
    image·caption give the pair weights w_it = exp(u·t - m_it)² and w_ic = exp(u·c - m_ic)², which
    are replaced by 1 where w_s = 1. The loss is::

        mean_i w_s·w_it·½[CE(u_i → texts) + CE(t_i → images)]
      + mean_i w_s·w_ic·½[CE(u_i → captions) + CE(c_i → images)]

    Weights carry no gradient. The running averages are means over the global batch.

    Args:
        ema: momentum of the running averages.
    """

    def __init__(self, ema: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"loss.alip_ema must be in [0, 1), got {ema!r}")
        self.ema = ema
        self.register_buffer("mean_text_caption", torch.ones(()))
        self.register_buffer("mean_image_text", torch.ones(()))
        self.register_buffer("mean_image_caption", torch.ones(()))

    @torch.no_grad()
    def _weights(self, img: Tensor, txt: Tensor, cap: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        sims = {
            "mean_text_caption": (txt * cap).sum(1),
            "mean_image_text": (img * txt).sum(1),
            "mean_image_caption": (img * cap).sum(1),
        }
        if self.training:
            for name, sim in sims.items():
                buf = getattr(self, name)
                buf.mul_(self.ema).add_((1.0 - self.ema) * _upcast(sim).mean())
        sample = torch.exp(_upcast(sims["mean_text_caption"]) - self.mean_text_caption).square().clamp(max=1.0)
        full = sample >= 1.0
        pair_text = torch.exp(_upcast(sims["mean_image_text"]) - self.mean_image_text).square()
        pair_text = pair_text.masked_fill(full, 1.0)
        pair_cap = torch.exp(_upcast(sims["mean_image_caption"]) - self.mean_image_caption).square()
        pair_cap = pair_cap.masked_fill(full, 1.0)
        return sample[rows], pair_text[rows], pair_cap[rows]

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        caption_features: Tensor,
        logit_scale: Tensor | float,
        *,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        all_caption_features: Tensor | None = None,
        row_offset: int = 0,
    ) -> dict[str, Tensor]:
        """Compute the ALIP loss.

        Args:
            image_features: [B, E] L2-normalised image features (this rank's rows).
            text_features: [B, E] L2-normalised features of the raw captions.
            caption_features: [B, E] L2-normalised features of the second captions.
            logit_scale: scalar, already exponentiated.
            all_image_features, all_text_features, all_caption_features: [N, E] all ranks' features,
                or None in a single process.
            row_offset: global index of this rank's first row.

        Returns:
            {"loss", "image_text", "image_caption", "sample_weight", "pair_weight_text",
            "pair_weight_caption"}: the total, its two parts and the mean weights of the local rows.
        """
        _check_pair(image_features, text_features)
        _check_pair(image_features, caption_features, "caption_features")
        _check_scale(logit_scale)
        img_cols, txt_cols = _columns(image_features, text_features, all_image_features, all_text_features)
        cap_cols = caption_features if all_caption_features is None else all_caption_features
        rows = slice(row_offset, row_offset + image_features.shape[0])
        sample, pair_text, pair_cap = self._weights(img_cols.detach(), txt_cols.detach(), cap_cols.detach(), rows)
        labels = torch.arange(image_features.shape[0], device=image_features.device) + row_offset

        def weighted_infonce(texts_rows: Tensor, text_cols: Tensor, weight: Tensor) -> Tensor:
            logits_image = _upcast(logit_scale * image_features @ text_cols.T)
            logits_text = _upcast(logit_scale * texts_rows @ img_cols.T)
            per_image = F.cross_entropy(logits_image, labels, reduction="none")
            per_text = F.cross_entropy(logits_text, labels, reduction="none")
            return (0.5 * (per_image + per_text) * sample * weight).mean()

        image_text = weighted_infonce(text_features, txt_cols, pair_text)
        image_caption = weighted_infonce(caption_features, cap_cols, pair_cap)
        return {
            "loss": image_text + image_caption,
            "image_text": image_text,
            "image_caption": image_caption,
            "sample_weight": sample.mean(),
            "pair_weight_text": pair_text.mean(),
            "pair_weight_caption": pair_cap.mean(),
        }
