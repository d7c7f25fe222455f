"""The training objective: combines the loss terms selected by a loss config.

Total loss::

    L = L_con + λ_rank·ρ(t)·(L_cross + L_in) + λ_gram·L_gram + λ_rel·L_rel + λ_txt·L_txt + λ_g·gate_l1

L_con is CLIP's InfoNCE (``clip``, ``rankclip``, ``dinorankclip``), CyCLIP's loss (``cyclip``) or ALIP's
weighted loss (``alip``). ρ(t) ramps linearly from 0 to 1 over the first ``rank_warmup_fraction`` of
training. The distillation and gate terms are added whenever the model returns the student outputs
and a teacher output is given, whatever the loss name, so an order sweep of DinoRankCLIP keeps them.

Default weights (``LOSS_DEFAULTS``) and why:

- ``rank_weight = 0.125``. RankCLIP's reference code multiplies the sum of two ListMLE losses (each a
  per-row sum over N positions) by a weight ramping to 2 and divides by 32·N. In the per-position
  units used here that is 2·2/32 = 0.125 on L_cross + L_in. At batch 128 with a freshly initialised
  tiny model (two random linear towers, logit scale 1/0.07, top_k = 32), L_cross + L_in is about 14
  against a CLIP term of about 6.4, and the gradient of 0.125·(L_cross + L_in) has about 9 % of the
  norm of CLIP's gradient, so the ranking term refines CLIP instead of swamping it (a test checks
  the bound of 25 %). Its share grows as CLIP's loss falls.
- ``rank_warmup_fraction = 2/3``: RankCLIP's weight reaches its maximum after 2/3 of the epochs.
- ``top_k = None`` (all N positions). Orders ≥ 2 cost O(N²·K) per list, so large batches should set
  ``top_k`` (for example 32 or 64).
- ``transition_heads = 1``, ``transition_head_dim = 32``: the chunked kernel's per-element cost does
  not depend on the head width (only the small lag-matrix products do), but the parameter count does.
- ``gram_weight``, ``relational_weight``, ``text_align_weight`` = 1.0: each term is a mean of bounded
  per-pair quantities (see ``distill.py``), of order 0.1 to 1 at initialisation.
- ``gate_l1_weight = 0.01``: a sigmoid gate starts near 0.5 per entry, adding about 0.01 to the loss.

Output keys: ``loss`` is the total, with gradient. The other keys are detached, for logging:

- ``clip`` (every name but ALIP);
- ``cyclic_in``, ``cyclic_cross`` (CyCLIP);
- ``alip``, ``alip_image_text``, ``alip_image_caption``, ``alip_sample_weight``,
  ``alip_pair_weight_text``, ``alip_pair_weight_caption`` (ALIP);
- ``rank_cross``, ``rank_in``, ``rank_weight`` (order ≥ 1);
- ``transition_scale_r`` for r = 2..R, the mean |α_r| over heads, which starts at 0 (order ≥ 2);
- ``gram``, ``relational``, ``text_align``, ``gate_l1`` (when their inputs are present).

ALIP reads the second caption's embeddings from the model output ``second_text_features``
([B, E], L2-normalised).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .contrastive import AlipLoss, cyclic_terms, infonce, pair_logits
from .distill import gate_l1, gram_loss, relational_loss, text_align_loss
from .ranking import RankingLoss, rank_weight_at

__all__ = ["DEFAULT_ORDER", "LOSS_DEFAULTS", "LOSS_NAMES", "Objective"]

LOSS_NAMES = ("clip", "cyclip", "alip", "rankclip", "dinorankclip")
DEFAULT_ORDER = {"clip": 0, "cyclip": 0, "alip": 0, "rankclip": 1, "dinorankclip": 3}

LOSS_DEFAULTS: dict[str, Any] = {
    "name": "dinorankclip",
    "order": None,
    "rank_weight": 0.125,
    "rank_warmup_fraction": 2 / 3,
    "top_k": None,
    "transition_heads": 1,
    "transition_head_dim": 32,
    "transition_detach": False,
    "gram_weight": 1.0,
    "relational_weight": 1.0,
    "text_align_weight": 1.0,
    "gate_l1_weight": 0.01,
    "cyclip_in_modal": 0.25,
    "cyclip_cross_modal": 0.25,
    "alip_ema": 0.99,
}


def _read(cfg: Any, field: str) -> Any:
    """Return ``cfg.field``, or its default from ``LOSS_DEFAULTS`` when the config has no such field."""
    return getattr(cfg, field, LOSS_DEFAULTS[field])


def _non_negative(cfg: Any, field: str) -> float:
    value = _read(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loss.{field} must be a finite number >= 0, got {value!r}")
    return float(value)


class Objective(nn.Module):
    """Combine the loss terms selected by ``cfg`` into the training loss.

    Contains the ranking loss's transition heads (trainable parameters: give them to the optimiser
    and to DistributedDataParallel together with the model).

    Args:
        cfg: a loss config with the fields of ``LOSS_DEFAULTS`` (attributes are only read).
        embed_dim: width E of the image and text embeddings.
    """

    def __init__(self, cfg: Any, embed_dim: int) -> None:
        super().__init__()
        name = _read(cfg, "name")
        if name not in LOSS_NAMES:
            raise ValueError(f"loss.name must be one of {LOSS_NAMES}, got {name!r}")
        order = _read(cfg, "order")
        self.name = name
        self.order = DEFAULT_ORDER[name] if order is None else order
        self.rank_weight = _non_negative(cfg, "rank_weight")
        self.rank_warmup_fraction = _non_negative(cfg, "rank_warmup_fraction")
        self.weights = {
            field: _non_negative(cfg, f"{field}_weight") for field in ("gram", "relational", "text_align", "gate_l1")
        }
        self.cyclip_weights = (_non_negative(cfg, "cyclip_in_modal"), _non_negative(cfg, "cyclip_cross_modal"))
        self.alip = AlipLoss(_non_negative(cfg, "alip_ema")) if name == "alip" else None
        try:
            self.ranking = RankingLoss(
                self.order,
                embed_dim,
                _read(cfg, "top_k"),
                heads=_read(cfg, "transition_heads"),
                head_dim=_read(cfg, "transition_head_dim"),
                detach=bool(_read(cfg, "transition_detach")),
            )
        except ValueError as err:
            raise ValueError(f"invalid ranking settings in the loss config: {err}") from err

    def forward(
        self,
        outputs: dict[str, Any],
        teacher: Any | None,
        *,
        progress: float,
        batch: dict | None = None,
        dist: Any | None = None,
    ) -> dict[str, Tensor]:
        """Compute the total loss and each term.

        Args:
            outputs: the model's output dict (``image_features``, ``text_features``, ``logit_scale``,
                gates and student outputs).
            teacher: the teacher's output (``cls``, ``patch_levels``) or None.
            progress: step / total steps in [0, 1], for the ranking-weight ramp.
            batch: the data batch (unused by the current terms).
            dist: a ``FeatureGather`` to score local rows against all ranks' columns, or None.

        Returns:
            {"loss": total (with gradient), "<term>": detached value, …}.
        """
        img, txt = outputs["image_features"], outputs["text_features"]
        scale = outputs["logit_scale"]
        gathered: dict[str, Tensor] = {}
        row_offset = 0
        if dist is not None and dist.world_size > 1:
            gathered = {"all_image_features": dist.gather(img), "all_text_features": dist.gather(txt)}
            row_offset = dist.row_offset(img.shape[0])

        terms: dict[str, Tensor] = {}
        logits = pair_logits(img, txt, scale, **gathered) if self.alip is None or self.order >= 1 else None
        if self.alip is not None:
            total = self._alip_terms(outputs, terms, dist, gathered, row_offset)
        else:
            total = infonce(*logits, row_offset)
            terms["clip"] = total
        if self.name == "cyclip":
            in_modal, cross_modal = cyclic_terms(img, txt, **gathered)
            terms["cyclic_in"], terms["cyclic_cross"] = in_modal, cross_modal
            total = total + self.cyclip_weights[0] * in_modal + self.cyclip_weights[1] * cross_modal

        if self.order >= 1:
            weight = rank_weight_at(progress, self.rank_weight, self.rank_warmup_fraction)
            rank_cross, rank_in = self.ranking.list_losses(img, txt, scale, logits=logits, **gathered)
            terms["rank_cross"], terms["rank_in"] = rank_cross, rank_in
            terms["rank_weight"] = torch.tensor(weight)
            total = total + weight * (rank_cross + rank_in)
            if self.ranking.transition is not None:
                for order, scale in enumerate(self.ranking.transition.scale, start=2):
                    terms[f"transition_scale_{order}"] = scale.abs().mean()

        total = total + self._distill_terms(outputs, teacher, terms, dist)
        result = {key: value.detach() for key, value in terms.items()}
        result["loss"] = total
        return result

    def _alip_terms(
        self, outputs: dict[str, Any], terms: dict, dist: Any | None, gathered: dict, row_offset: int
    ) -> Tensor:
        captions = outputs.get("second_text_features")
        if captions is None:
            raise ValueError(
                "loss.name='alip' needs the embeddings of a second caption per image in the model output "
                "'second_text_features'; set data.second_caption_column to the column of second captions "
                "so that the trainer encodes them"
            )
        if gathered:
            gathered = {**gathered, "all_caption_features": dist.gather(captions)}
        parts = self.alip(
            outputs["image_features"],
            outputs["text_features"],
            captions,
            outputs["logit_scale"],
            row_offset=row_offset,
            **gathered,
        )
        terms["alip"] = parts["loss"]
        for key in ("image_text", "image_caption", "sample_weight", "pair_weight_text", "pair_weight_caption"):
            terms[f"alip_{key}"] = parts[key]
        return parts["loss"]

    def _distill_terms(self, outputs: dict[str, Any], teacher: Any | None, terms: dict, dist: Any | None) -> Tensor:
        total = torch.zeros((), device=outputs["image_features"].device)
        gate = gate_l1(outputs.get("image_gate"), outputs.get("text_gate"))
        if gate is not None:
            terms["gate_l1"] = gate
            total = total + self.weights["gate_l1"] * gate
        if teacher is None:
            return total
        student_levels = outputs.get("student_patch_levels")
        if student_levels is not None:
            terms["gram"] = gram_loss(student_levels, teacher.patch_levels)
            total = total + self.weights["gram"] * terms["gram"]
        student_global = outputs.get("student_global")
        if student_global is not None:
            gathered = {}
            row_offset = 0
            if dist is not None and dist.world_size > 1:
                gathered = {
                    "all_student_global": dist.gather(student_global),
                    "all_teacher_global": dist.gather(teacher.cls.detach()),
                }
                row_offset = dist.row_offset(student_global.shape[0])
            terms["relational"] = relational_loss(student_global, teacher.cls, row_offset=row_offset, **gathered)
            total = total + self.weights["relational"] * terms["relational"]
        text_student = outputs.get("text_student")
        if text_student is not None:
            terms["text_align"] = text_align_loss(text_student, teacher.cls)
            total = total + self.weights["text_align"] * terms["text_align"]
        return total
