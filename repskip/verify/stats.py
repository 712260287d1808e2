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


# --- is a comparison informative? -------------------------------------------------------------
# A retention whose 95% interval is wider than this says little about a compressed model.
MAX_CI_WIDTH = 0.2
# A pass/fail benchmark whose base gets fewer items right than this has too little to retain.
MIN_BASE_CORRECT = 5
# The drop in retention the item count should be able to see (power calculation).
DETECT_DROP = 0.05


def items_for_power(diffs: Sequence[float], effect: float, *, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Items a paired test needs to detect a mean paired difference of ``effect`` with this
    power at two-sided level ``alpha``: n = ((z_{1-alpha/2} + z_{power}) * sd / effect)^2, the
    normal approximation of the paired t-test and, for 0/1 outcomes, of McNemar's test (whose
    per-item difference variance is the discordant fraction minus the squared mean
    difference). ``sd`` is the spread of the observed per-item differences; None when they
    show none (the items never disagree: no estimate of how many would)."""
    from statistics import NormalDist

    n = len(diffs)
    if n < 2 or effect <= 0:
        return None
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    if var <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return max(2, math.ceil((z * math.sqrt(var) / effect) ** 2))


def informative(base: Sequence[float], compressed: Sequence[float], base_score: float, ci: Sequence[float],
                higher_is_better: bool, effect: float) -> dict:
    """Whether a retention carries information, why not, and how many items would let the
    paired test see a DETECT_DROP loss of retention (``effect``: that loss on the per-item
    scale of ``base``/``compressed``)."""
    reasons = []
    binary = all(v in (0.0, 1.0) for v in (*base, *compressed))
    if higher_is_better and (base_score == 0 or (binary and sum(base) < MIN_BASE_CORRECT)):
        reasons.append(f"the base gets {int(sum(base)) if binary else base_score:g} "
                       f"{'item(s) right' if binary else 'on average'}: too little to retain")
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo > MAX_CI_WIDTH:
        reasons.append(f"the 95% interval is {hi - lo:.2f} wide (more than {MAX_CI_WIDTH})"
                       if math.isfinite(lo) and math.isfinite(hi) else "no interval could be computed")
    needed = items_for_power([y - x for x, y in zip(base, compressed)], effect)
    return {"uninformative": bool(reasons), "why": "; ".join(reasons),
            "items_needed": needed, "detect_drop": DETECT_DROP, "alpha": 0.05, "power": 0.8}
