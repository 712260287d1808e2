"""What a benchmark plugin must do: load items from a source, and score a completion.

Registered under ``repskip.benchmarks``. The verify command (prompting, sampling, retention
statistics, caching) is built on this interface.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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

    @abc.abstractmethod
    def load(self, source: str | Path | None = None) -> list[Item]:
        """All items, from ``source`` (a path, or whatever the benchmark accepts) or the default."""

    @abc.abstractmethod
    def score(self, item: Item, completion: str) -> float:
        """1.0 for a correct completion, 0.0 for a wrong one (or a partial credit in between)."""


def get_benchmark(name: str) -> Benchmark:
    return registry.create("benchmarks", name)
