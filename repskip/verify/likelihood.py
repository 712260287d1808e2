"""Negative log-likelihood of a text under a model: next-token for autoregressive models, the
masked-token estimate for masked-diffusion models."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


@torch.inference_mode()
def autoregressive_nll(model: Any, family: Any, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(x_t | x_<t) over t >= 1 of one sequence [1, T], and the count."""
    logits = family.logits(model, ids, torch.ones_like(ids)).float()
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


@torch.inference_mode()
def masked_diffusion_nll(
    model: Any, family: Any, ids: torch.Tensor, mask_id: int, samples: int = 8, seed: int = 0
) -> tuple[float, int]:
    """The masked-diffusion bound on -log p(x) (LLaDA's evaluation): for mask ratios t
    stratified over (0, 1), mask each token with probability t and add
    (1/t) * sum over masked tokens of -log p(x_i | x_t); average over the samples.
    Returns the bound and the number of tokens, so that exp(bound / tokens) is a perplexity."""
    generator = torch.Generator().manual_seed(seed)
    T = ids.shape[1]
    total = 0.0
    for k in range(samples):
        t = (k + 0.5) / samples
        masked = torch.rand(T, generator=generator) < t
        if not masked.any():
            masked[torch.randint(T, (1,), generator=generator)] = True
        noisy = torch.where(masked[None, :].to(ids.device), torch.full_like(ids, mask_id), ids)
        logits = family.token_logits(model, noisy, torch.ones_like(ids)).float()
        nll = F.cross_entropy(logits[0, masked.to(ids.device)], ids[0, masked.to(ids.device)], reduction="sum")
        total += float(nll) / t
    return total / samples, T
