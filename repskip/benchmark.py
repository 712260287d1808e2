"""What a benchmark plugin must do: load items, build prompts, and score completions.

Registered under ``repskip.benchmarks``. A benchmark is either a *generation* benchmark (the
model continues a prompt; ``score`` grades the text) or a *perplexity* benchmark (the model
scores text; ``verify`` computes the negative log-likelihood itself).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from . import registry


@dataclass(frozen=True)
class Item:
    """One benchmark question: a stable id, the prompt text and what scoring needs."""

    id: str
    prompt: str
    reference: Any
    meta: dict = field(default_factory=dict)


class Benchmark(abc.ABC):
    #: Where ``load(None)`` reads from, described for error messages and reports.
    default_source: ClassVar[str] = ""
    kind: ClassVar[Literal["generation", "perplexity"]] = "generation"
    #: The metric retention is computed on; ``score`` returns it among others.
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    #: Generation needs: new tokens to allow, and strings after which the answer is over.
    max_new_tokens: ClassVar[int] = 256
    stop: ClassVar[tuple[str, ...]] = ()
    #: Whether ``score`` runs the completion as code (through repskip.verify.sandbox): verify then
    #: checks that the sandbox can be built before it loads any model.
    runs_code: ClassVar[bool] = False

    def __init__(self, **options: Any):
        """``options`` are benchmark-specific (number of shots, say); unknown ones are errors."""
        self.options = options

    @abc.abstractmethod
    def load(self, source: str | Path | None = None) -> list[Item]:
        """All items, from ``source`` (a path, or whatever the benchmark accepts) or the default.
        Raise RepskipError with a one-line fix when the source is missing, empty or malformed."""

    def prompt(self, item: Item, tokenizer: Any, chat: bool) -> str:
        """The text the model continues: through the chat template when ``chat`` and present."""
        from .sampler import format_prompt

        return format_prompt(tokenizer, item.prompt, chat)

    def score(self, item: Item, completion: str) -> dict[str, float]:
        """Metrics for one completion, ``primary_metric`` among them (1.0 right, 0.0 wrong)."""
        raise NotImplementedError


def get_benchmark(name: str, **options: Any) -> Benchmark:
    cls = registry.loaded("benchmarks").get(name)
    if cls is None:
        registry.create("benchmarks", name)  # raises the error that lists the known ones
    return cls(**options)
