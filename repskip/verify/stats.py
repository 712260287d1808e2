"""Paired statistics for base-versus-compressed comparisons on the same items."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


def retention(base: float, compressed: float, higher_is_better: bool = True) -> float:
    """compressed / base for scores; base / compressed for losses such as perplexity."""
    if higher_is_better:
        return compressed / base if base else (1.0 if compressed == base else math.inf)
    return base / compressed if compressed else math.inf


def bootstrap_ci(
    base: Sequence[float],
    compressed: Sequence[float],
    statistic: Callable[[Sequence[float], Sequence[float]], float],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over paired resamples of the items."""
    n = len(base)
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        value = statistic([base[i] for i in idx], [compressed[i] for i in idx])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    values.sort()
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[int((1 + level) / 2 * (len(values) - 1))]
    return lo, hi


def mcnemar_exact(base: Sequence[float], compressed: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (binomial on discordant pairs)."""
    b = sum(1 for x, y in zip(base, compressed) if x >= 0.5 > y)  # base right, compressed wrong
    c = sum(1 for x, y in zip(base, compressed) if y >= 0.5 > x)
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_permutation(base: Sequence[float], compressed: Sequence[float], *, resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of the mean paired difference by random sign flips."""
    diffs = [y - x for x, y in zip(base, compressed)]
    observed = abs(sum(diffs))
    if observed == 0:
        return 1.0
    rng = random.Random(seed)
    hits = sum(1 for _ in range(resamples) if abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12)
    return (hits + 1) / (resamples + 1)


def paired_test(base: Sequence[float], compressed: Sequence[float]) -> tuple[str, float]:
    """McNemar for 0/1 outcomes, a sign-flip permutation test otherwise."""
    binary = all(v in (0.0, 1.0) for v in (*base, *compressed))
    if binary:
        return "mcnemar-exact", mcnemar_exact(base, compressed)
    return "paired-permutation", paired_permutation(base, compressed)
