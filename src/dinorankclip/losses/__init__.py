"""Losses: CLIP, CyCLIP, ALIP, order-R Plackett-Luce ranking, distillation, and the combining Objective.

Every loss takes tensors, never batches. See each module's docstring for its normalisation.
"""

from .contrastive import (
    AlipLoss,
    check_alip_columns,
    clip_loss,
    cyclic_terms,
    cyclip_loss,
    infonce,
    pair_logits,
)
from .distill import gate_l1, gram_loss, relational_loss, text_align_loss
from .distributed import FeatureGather, all_gather_with_grad
from .objective import DEFAULT_ORDER, LOSS_DEFAULTS, LOSS_NAMES, Objective
from .ordering import descending_order
from .plackett_luce import plackett_luce_loss, plackett_luce_nll
from .ranking import RankingLoss, rank_weight_at
from .transition import TransitionHeads, transition_nll

__all__ = [
    "AlipLoss",
    "check_alip_columns",
    "DEFAULT_ORDER",
    "LOSS_DEFAULTS",
    "LOSS_NAMES",
    "FeatureGather",
    "Objective",
    "RankingLoss",
    "TransitionHeads",
    "all_gather_with_grad",
    "clip_loss",
    "cyclic_terms",
    "cyclip_loss",
    "descending_order",
    "gate_l1",
    "gram_loss",
    "infonce",
    "pair_logits",
    "plackett_luce_loss",
    "plackett_luce_nll",
    "rank_weight_at",
    "relational_loss",
    "text_align_loss",
    "transition_nll",
]
