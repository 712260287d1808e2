"""What a benchmark plugin must do: load items, build prompts, and score completions.

Registered under ``repskip.benchmarks``. A benchmark is of one of three kinds:

- *generation*: the model continues a prompt; ``score`` grades the text.
- *perplexity*: the model scores text; ``verify`` computes the negative log-likelihood itself.
- *multiple_choice* (lm-evaluation-harness's ``multiple_choice`` output type): ``item.prompt``
  is the context, ``item.meta["choices"]`` the answer texts and ``item.reference`` the index of
  the right one. ``verify`` computes log p(``target_delimiter`` + choice | context) for every
  choice (repskip.verify.likelihood.continuation_logprobs: exact for autoregressive models, the
  masked Monte Carlo estimate with ``options["mc_samples"]`` draws for diffusion models) and
  ``score_choices`` turns them into metrics: by default ``acc`` (the most likely choice is
  right) and ``acc_norm`` (the same with each log-probability divided by the choice text's
  length in characters), as lm-eval does. The context is used as it is: no chat template.
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
    kind: ClassVar[Literal["generation", "perplexity", "multiple_choice"]] = "generation"
    #: The metric retention is computed on; ``score`` returns it among others.
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    #: Generation needs: new tokens to allow, and strings after which the answer is over.
    max_new_tokens: ClassVar[int] = 256
    stop: ClassVar[tuple[str, ...]] = ()
    #: Whether ``score`` runs the completion as code (through repskip.verify.sandbox): verify then
    #: checks that the sandbox can be built before it loads any model.
    runs_code: ClassVar[bool] = False
    #: Multiple choice: what goes between the context and each choice (lm-eval's default).
    target_delimiter: ClassVar[str] = " "

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

    def generation_budget(self, tokenizer: Any, chat: bool) -> int:
        """New tokens a completion may take with the prompt ``prompt`` makes for this
        tokenizer and ``chat`` setting (a chain of thought needs more than a few-shot answer)."""
        return self.max_new_tokens

    def prompt_variant(self, tokenizer: Any, chat: bool) -> str:
        """A few words on which prompt runs (shown and recorded, so figures are compared with
        the right published ones)."""
        templated = bool(chat and getattr(tokenizer, "chat_template", None))
        return "through the chat template" if templated else "plain text"

    def continuations(self, item: Item) -> list[str]:
        """Multiple choice: the strings scored after ``item.prompt``, one per choice."""
        return [self.target_delimiter + choice for choice in item.meta["choices"]]

    def score_choices(self, item: Item, logprobs: list[float]) -> dict[str, float]:
        """Multiple choice: metrics from each choice's log-probability (in ``continuations``
        order), ``primary_metric`` among them. The default is lm-eval's: ``acc`` is 1.0 when the
        highest log-probability is the reference index's, ``acc_norm`` the same after dividing
        each by the length in characters of the choice text (without the delimiter; an empty
        text counts as 1). Ties go to the first choice, as numpy's argmax."""
        lengths = [max(1, len(choice)) for choice in item.meta["choices"]]
        best = max(range(len(logprobs)), key=lambda i: logprobs[i])
        best_norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / lengths[i])
        return {"acc": float(best == item.reference), "acc_norm": float(best_norm == item.reference)}


def get_benchmark(name: str, **options: Any) -> Benchmark:
    cls = registry.loaded("benchmarks").get(name)
    if cls is None:
        registry.create("benchmarks", name)  # raises the error that lists the known ones
    return cls(**options)
