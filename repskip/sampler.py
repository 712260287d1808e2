"""What a sampler plugin must do: turn prompts into text with a model, counting forwards."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from . import registry
from .errors import RepskipError


@dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int]]
    forward_passes: int
    settings: dict


class Sampler(abc.ABC):
    """Registered under ``repskip.samplers``. ``defaults`` lists every setting it takes."""

    generative_kind: ClassVar[str] = "autoregressive"
    defaults: ClassVar[dict[str, Any]] = {}

    def settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise RepskipError(
                f"sampler setting {unknown[0]!r} is not known to {type(self).__name__}; "
                f"it takes: {', '.join(self.defaults)}"
            )
        return {**self.defaults, **overrides}

    @abc.abstractmethod
    def generate(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        *,
        family: Any = None,
        seed: int = 0,
        **settings: Any,
    ) -> Generation:
        """Continue each prompt (already formatted: chat template applied if wanted).

        ``family`` is the model's family plugin, for samplers that need what it knows
        (a diffusion model's mask token and logit alignment); others may ignore it.
        """


@contextlib.contextmanager
def count_forwards(model: Any) -> Iterator[list[int]]:
    """Count calls of ``model``'s forward while the block runs: ``counter[0]``."""
    counter = [0]

    def hook(module, args, kwargs):
        counter[0] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def get_sampler(name: str, family: Any = None) -> Sampler:
    """The sampler plugin ``name``; with ``family``, one that can drive that family's models."""
    sampler = registry.create("samplers", name)
    kind = getattr(family, "generative_kind", None)
    if kind and sampler.generative_kind != kind:
        raise RepskipError(
            f"sampler {name!r} is for {sampler.generative_kind} models; this model is {kind}: "
            f"use {family.default_sampler!r}"
        )
    return sampler



def format_prompt(tokenizer: Any, text: str, chat: bool) -> str:
    """The prompt as the model expects it: through the chat template when asked and present."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text
