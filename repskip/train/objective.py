"""What a training objective plugin must do, and the losses healing minimises with it.

An objective is registered under the ``repskip.objectives`` entry-point group, and a family
names its own in ``Family.training_objective``, as it names its sampler. The plugin decides
what the model sees and what each position should predict (next-token prediction for an
autoregressive model; a randomly masked copy of the sequence for a masked-diffusion model);
the core turns that into a loss:

- ``lm``: the weighted cross-entropy of the scored positions against their targets, summed
  and divided by the batch's normaliser (for LLaDA: masked tokens weighted 1/t, divided by
  the number of tokens, as in its pre-training);
- ``kd``: the KL divergence from the teacher's distribution to the student's at the same
  positions, both at temperature ``T``, weighted and normalised the same way, times ``T**2``
  (Hinton et al.) so that its gradients keep their scale whatever ``T`` is;
- ``mix``: ``kd_weight * kd + (1 - kd_weight) * lm``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import registry
from ..errors import RepskipError

LOSSES = ("kd", "lm", "mix")


@dataclass
class Batch:
    """One micro-batch as an objective prepares it."""

    ids: torch.Tensor  # [B, T] what the model sees
    mask: torch.Tensor  # [B, T] attention mask (1: real token)
    scored: torch.Tensor  # bool [B, T] positions whose prediction counts
    targets: torch.Tensor  # [B, T] the token each position should predict (read where scored)
    weights: torch.Tensor  # float [B, T] the weight of each position's loss (read where scored)
    normaliser: float  # what the weighted sum is divided by


class TrainingObjective(abc.ABC):
    """Registered under ``repskip.objectives``; stateless (every random draw comes from the
    generator it is given, so a resumed run draws what an uninterrupted one would)."""

    generative_kind: ClassVar[str] = "autoregressive"

    @abc.abstractmethod
    def prepare(self, ids: torch.Tensor, mask: torch.Tensor, *, family: Any, config: dict,
                generator: torch.Generator) -> Batch:
        """The batch the models see, from packed token ids ``ids`` and their ``mask``."""

    @abc.abstractmethod
    def logits(self, family: Any, model: Any, batch: Batch) -> torch.Tensor:
        """Logits [B, T, V] aligned with ``batch.targets`` (position i scores targets[:, i])."""


def get_objective(name: str, family: Any) -> TrainingObjective:
    objective = registry.create("objectives", name)
    if objective.generative_kind != family.generative_kind:
        raise RepskipError(
            f"training objective {name!r} is for {objective.generative_kind} models; this model is "
            f"{family.generative_kind}: use {family.training_objective!r}"
        )
    return objective


def losses(batch: Batch, student: torch.Tensor, teacher: torch.Tensor | None, temperature: float = 1.0
           ) -> dict[str, torch.Tensor]:
    """``lm`` and, with teacher logits, ``kd`` for one batch (scalars, differentiable)."""
    scored = batch.scored.to(student.device)
    weights = batch.weights.to(student.device)[scored].float()
    picked = student[scored].float()
    ce = F.cross_entropy(picked, batch.targets.to(student.device)[scored], reduction="none")
    out = {"lm": (weights * ce).sum() / batch.normaliser}
    if teacher is not None:
        t = temperature
        log_p = F.log_softmax(teacher[scored.to(teacher.device)].float().to(student.device) / t, -1)
        log_q = F.log_softmax(picked / t, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        out["kd"] = (weights * kl).sum() / batch.normaliser * t * t
    return out


def combine(parts: dict[str, torch.Tensor], loss: str, kd_weight: float) -> torch.Tensor:
    if loss == "lm":
        return parts["lm"]
    if loss == "kd":
        return parts["kd"]
    return kd_weight * parts["kd"] + (1.0 - kd_weight) * parts["lm"]
