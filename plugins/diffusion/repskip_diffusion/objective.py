"""The masked-diffusion objective LLaDA is pre-trained on, and Dream in its shifted form.

For each row a ratio t is drawn uniformly, and each real token is replaced by the mask token
with probability p = (1 - eps) t + eps (eps = 1e-3, as in LLaDA's reference training code);
the masked tokens' cross-entropy is weighted by 1 / p and the sum divided by the number of
real tokens. Dream's logits at position i predict token i + 1 (its AR initialisation); the
family realigns them (``token_logits``), which is all its shifted form changes.
"""

from __future__ import annotations

from typing import Any

import torch
from repskip.train.objective import Batch, TrainingObjective

EPS = 1e-3


class MaskedDiffusionObjective(TrainingObjective):
    generative_kind = "diffusion"

    def prepare(self, ids: torch.Tensor, mask: torch.Tensor, *, family: Any, config: dict,
                generator: torch.Generator) -> Batch:
        mask_id = family.mask_token_id(config)
        valid = mask.bool()
        t = torch.rand(ids.shape[0], generator=generator)
        p = ((1 - EPS) * t + EPS)[:, None].expand(ids.shape)
        masked = valid & (torch.rand(ids.shape, generator=generator) < p)
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        return Batch(noisy, mask, masked, ids, 1.0 / p, normaliser=float(max(int(valid.sum()), 1)))

    def logits(self, family: Any, model: Any, batch: Batch) -> torch.Tensor:
        device = next(model.parameters()).device
        return family.token_logits(model, batch.ids.to(device), batch.mask.to(device))
