"""The calibration loss that loss-aware selection minimises and linear repair fits under.

Autoregressive families: next-token negative log-likelihood over the real tokens. Diffusion
families: the masked-token loss their training minimises, at fixed ratios t: each real token
is replaced by the mask token with probability t (seeded, at least one per row), and the
masked tokens' cross-entropy is weighted by 1/t (LLaDA's objective; Dream's shifted logits
are realigned by the family). ``kl`` instead measures the KL divergence from the full
model's predictions at the same positions, which needs the full model's log-probabilities
of each batch (kept in float16 while the batch is in use).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime import model_device

OBJECTIVES = ("nll", "kl")
DIFFUSION_RATIOS = (0.25, 0.5, 0.75)
KL_ROWS = 256  # scored positions per step of the KL sum


@dataclass
class Pass:
    """One forward of a calibration batch: the ids the model sees, its attention mask, the
    positions whose prediction counts, their targets, and the weight of their loss."""

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor  # bool [B, T]: positions whose logits are scored
    targets: torch.Tensor  # [n] the token each scored position should predict
    weight: float
    states: torch.Tensor  # bool [B, T]: positions whose hidden states a repair is fitted on


class Objective:
    def __init__(self, family: Any, kind: str = "nll", mask_id: int | None = None,
                 ratios: Sequence[float] = DIFFUSION_RATIOS, seed: int = 0):
        if kind not in OBJECTIVES:
            from ..errors import RepskipError

            raise RepskipError(f"unknown objective {kind!r}; choose one of {', '.join(OBJECTIVES)}")
        self.family, self.kind, self.mask_id = family, kind, mask_id
        self.diffusion = family.generative_kind == "diffusion"
        self.ratios, self.seed = list(ratios), seed

    def passes(self, ids: torch.Tensor, mask: torch.Tensor, batch_index: int) -> Iterator[Pass]:
        """The forward passes of one right-padded batch (seeded by its index, so every call
        for the same batch gives the same masks)."""
        valid = mask.bool()
        if not self.diffusion:
            scored = valid.clone()
            scored[:, -1] = False
            scored &= valid.roll(-1, dims=1)  # position t predicts token t + 1, itself real
            yield Pass(ids, mask, scored, ids.roll(-1, dims=1)[scored], 1.0, valid)
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        for ratio in self.ratios:
            masked = valid & (torch.rand(ids.shape, generator=generator) < ratio)
            rows = torch.arange(ids.shape[0])
            first = valid.float().argmax(1)
            masked[rows, first] |= ~masked.any(1) & valid[rows, first]
            noisy = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
            yield Pass(noisy, mask, masked, ids[masked], 1.0 / ratio, valid)

    def logits(self, model: Any, p: Pass) -> torch.Tensor:
        device = model_device(model)
        ids, mask = p.ids.to(device), p.mask.to(device)
        if self.diffusion:
            return self.family.token_logits(model, ids, mask)
        return self.family.logits(model, ids, mask)

    def reference(self, logits: torch.Tensor, p: Pass) -> torch.Tensor | None:
        """What the loss of a pruned model is measured against: the full model's log-probs
        at the scored positions for ``kl``; nothing for ``nll``."""
        if self.kind != "kl":
            return None
        return F.log_softmax(logits[p.scored.to(logits.device)].float(), -1).half()

    def loss(self, logits: torch.Tensor, p: Pass, reference: torch.Tensor | None = None) -> tuple[float, int]:
        """(weighted loss summed over the scored positions, what it is a sum over: predicted
        tokens for an autoregressive model, real tokens for a diffusion model, whose loss is
        normalised by the sequence length as in training)."""
        if self.kind == "kl":
            assert reference is not None
            # a few hundred positions at a time: the vocabulary-wide temporaries stay small
            # (on a 49k vocabulary this halves the time of one pass over all of them)
            flat = logits.reshape(-1, logits.shape[-1])
            where = p.scored.to(logits.device).reshape(-1).nonzero().squeeze(1)
            total = 0.0
            for start in range(0, where.shape[0], KL_ROWS):
                ref = reference[start : start + KL_ROWS].float()
                rows = F.log_softmax(flat[where[start : start + KL_ROWS]].float(), -1)
                total += float((ref.exp() * (ref - rows)).sum())
        else:
            picked = logits[p.scored.to(logits.device)].float()
            total = float(F.cross_entropy(picked, p.targets.to(picked.device), reduction="sum"))
        return total * p.weight, int(p.states.sum() if self.diffusion else p.scored.sum())
