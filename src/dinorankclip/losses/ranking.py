"""Order-R Plackett-Luce ranking consistency over RankCLIP's four lists.

With C = s·U Vᵀ, A = s·U Uᵀ and B = s·V Vᵀ, each row of a score matrix is ranked by the matching row
of another matrix (the target, used only as an order):

- cross-modal: rows of C ranked by rows of Cᵀ, and rows of Cᵀ ranked by rows of C;
- in-modal: rows of A ranked by rows of B, and rows of B ranked by rows of A.

Order 1 is RankCLIP's ListMLE. Orders 2..4 add the transition terms of ``transition.py``, whose
scales start at 0, so every order starts exactly at the order below. Order 0 means no ranking term
(plain CLIP) and gives a zero loss.

Normalisation: each list's loss is the per-row NLL divided by the number of modelled positions K,
then averaged over rows, i.e. the mean NLL per ranked position. It is of order log N, like a
cross-entropy. ``L_cross`` and ``L_in`` are each the mean of their two directions, and the module
returns L_cross + L_in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .contrastive import pair_logits
from .ordering import check_top_k, descending_orders
from .plackett_luce import plackett_luce_nll
from .transition import MAX_ORDER, TransitionHeads
from .transition_kernel import transition_nll_chunked

__all__ = ["RankingLoss", "rank_weight_at"]


class _ScaledGram(torch.autograd.Function):
    """s·F Fᵀ with a one-matmul backward: ∂F = s·(∂A + ∂Aᵀ) F and ∂s = ½ Σ F ⊙ ((∂A + ∂Aᵀ) F).

    Autograd's matmul backward would run two matmuls, one per operand, although both are F.
    """

    @staticmethod
    def forward(ctx, features: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(features, scale)
        return scale * (features @ features.T)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        features, scale = ctx.saved_tensors
        # A transposed copy then an in-place add reads memory in order; grad + grad.T does not.
        product = grad.T.contiguous().add_(grad) @ features
        grad_scale = 0.5 * (features * product).sum() if ctx.needs_input_grad[1] else None
        return scale * product, grad_scale


def _in_modal_scores(rows: Tensor, cols: Tensor | None, logit_scale: Tensor | float) -> Tensor:
    """Return s·rows @ colsᵀ ([B, N]); cols None means cols = rows (a single process)."""
    if cols is not None or torch.is_autocast_enabled(rows.device.type):
        return logit_scale * rows @ (rows if cols is None else cols).T
    scale = torch.as_tensor(logit_scale, dtype=rows.dtype, device=rows.device)
    return _ScaledGram.apply(rows, scale)


def rank_weight_at(progress: float, rank_weight: float, warmup_fraction: float) -> float:
    """Return the ranking weight at ``progress`` (step / total steps) of a linear ramp from 0.

    The weight rises linearly from 0 to ``rank_weight`` over the first ``warmup_fraction`` of
    training and stays there, as RankCLIP's schedule does.
    """
    if warmup_fraction <= 0:
        return rank_weight
    return rank_weight * min(max(progress / warmup_fraction, 0.0), 1.0)


class RankingLoss(nn.Module):
    """Summed cross-modal and in-modal Plackett-Luce ranking loss of order R.

    Args:
        order: Plackett-Luce order R in 0..4 (0: no ranking term, 1: RankCLIP, ≥2: transitions).
        embed_dim: width E of the image and text features.
        top_k: number of modelled positions K of each target ranking (None: all N).
        heads: heads per transition order.
        head_dim: width of each transition head.
        detach: stop gradients from the transition terms into the features they read.
    """

    def __init__(
        self,
        order: int,
        embed_dim: int,
        top_k: int | None = None,
        *,
        heads: int = 1,
        head_dim: int = 32,
        detach: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an int in 0..{MAX_ORDER}, got {order!r}")
        check_top_k(top_k, 1)
        self.order = order
        self.embed_dim = embed_dim
        self.top_k = top_k
        self.detach = detach
        self.transition = TransitionHeads(order, embed_dim, heads=heads, head_dim=head_dim) if order >= 2 else None

    def list_losses(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        *,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        logits: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return (L_cross, L_in), each the mean of its two lists' per-position NLL.

        Args:
            image_features: [B, E] L2-normalised image features (this rank's rows).
            text_features: [B, E] L2-normalised text features (this rank's rows).
            logit_scale: scalar, already exponentiated.
            all_image_features: [N, E] all ranks' image features (None in a single process).
            all_text_features: [N, E] all ranks' text features (None in a single process).
            logits: (logits_per_image, logits_per_text) from ``pair_logits`` for the same inputs,
                to share them with the contrastive loss; computed here when None.
        """
        if (all_image_features is None) != (all_text_features is None):
            raise ValueError("all_image_features and all_text_features must be given together or not at all")
        if self.transition is not None and image_features.shape[-1] != self.embed_dim:
            raise ValueError(
                f"features of width {image_features.shape[-1]} do not match RankingLoss(embed_dim={self.embed_dim}); "
                "build the loss with the embedding width of the features"
            )
        img_cols = image_features if all_image_features is None else all_image_features
        txt_cols = text_features if all_text_features is None else all_text_features
        if self.order == 0:
            zero = image_features.new_zeros((), dtype=torch.promote_types(image_features.dtype, torch.float32))
            return zero, zero
        if logits is None:
            gathered = {"all_image_features": all_image_features, "all_text_features": all_text_features}
            logits = pair_logits(image_features, text_features, logit_scale, **gathered)
        cross_img = logits[0]  # [B, N]: image rows over texts
        cross_txt = logits[1]  # [B, N]: text rows over images (a transposed view in a single process)
        if self.transition is None:
            # ListMLE gathers whole rows in a random order, which is slow across a transposed view.
            cross_txt = cross_txt.contiguous()
        in_img = _in_modal_scores(image_features, all_image_features, logit_scale)  # [B, N]
        in_txt = _in_modal_scores(text_features, all_text_features, logit_scale)  # [B, N]
        # (scores, target scores, candidate embeddings)
        lists = (
            (cross_img, cross_txt, txt_cols),
            (cross_txt, cross_img, img_cols),
            (in_img, in_txt, img_cols),
            (in_txt, in_img, txt_cols),
        )
        # The four targets are ordered together, which keeps the CPU sorting threads busy at once.
        first_order = self.transition is None
        orders = descending_orders([target for _, target, _ in lists], self.top_k, reverse=first_order)
        factors: dict[int, tuple[Tensor, Tensor]] = {}  # lag factors per candidate set (images, texts)
        losses = [
            self._list_loss(scores, order, cand, factors)
            for (scores, _, cand), order in zip(lists, orders, strict=True)
        ]
        return 0.5 * (losses[0] + losses[1]), 0.5 * (losses[2] + losses[3])

    def _head_input(self, candidates: Tensor) -> Tensor:
        """Return ``candidates`` in the heads' dtype (half-precision features without autocast included)."""
        dtype = self.transition.scale[0].dtype
        if torch.is_autocast_enabled(candidates.device.type) or candidates.dtype == dtype:
            return candidates
        return candidates.to(dtype)

    def _list_loss(self, scores: Tensor, order: Tensor, candidates: Tensor, factors: dict) -> Tensor:
        num_pos = check_top_k(self.top_k, scores.shape[1])
        if self.transition is None:
            nll = plackett_luce_nll(scores, order, num_pos, reverse=True)
        else:
            if id(candidates) not in factors:
                factors[id(candidates)] = self.transition.lag_factors(
                    self._head_input(candidates.detach() if self.detach else candidates)
                )
            queries, keys = factors[id(candidates)]
            nll = transition_nll_chunked(scores, order, queries, keys)
        return nll.mean() / num_pos

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        *,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        logits: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Return L_cross + L_in (see ``list_losses``)."""
        cross, inmodal = self.list_losses(
            image_features,
            text_features,
            logit_scale,
            all_image_features=all_image_features,
            all_text_features=all_text_features,
            logits=logits,
        )
        return cross + inmodal
