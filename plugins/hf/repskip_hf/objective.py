"""Next-token prediction: what an autoregressive decoder is trained on, and healed with."""

from __future__ import annotations

from typing import Any

import torch
from repskip.train.objective import Batch, TrainingObjective


class CausalLMObjective(TrainingObjective):
    """Position t predicts token t + 1, wherever both are real tokens."""

    generative_kind = "autoregressive"

    def prepare(self, ids: torch.Tensor, mask: torch.Tensor, *, family: Any, config: dict,
                generator: torch.Generator) -> Batch:
        valid = mask.bool()
        scored = valid & valid.roll(-1, dims=1)
        scored[:, -1] = False
        return Batch(ids, mask, scored, ids.roll(-1, dims=1), torch.ones(ids.shape),
                     normaliser=float(max(int(scored.sum()), 1)))

    def logits(self, family: Any, model: Any, batch: Batch) -> torch.Tensor:
        device = next(model.parameters()).device
        return family.logits(model, batch.ids.to(device), batch.mask.to(device))
