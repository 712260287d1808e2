import math

import pytest

from repskip.verify.stats import bootstrap_ci, mcnemar_exact, paired_permutation, paired_test, retention


def mean_ratio(b, c):
    return retention(sum(b) / len(b), sum(c) / len(c))


def test_retention_directions():
    assert retention(0.8, 0.6) == pytest.approx(0.75)
    assert retention(20.0, 25.0, higher_is_better=False) == pytest.approx(0.8)  # perplexity rose
    assert retention(0.0, 0.0) == 1.0


def test_identical_models_have_retention_one_with_a_degenerate_interval_and_p_one():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    lo, hi = bootstrap_ci(scores, scores, mean_ratio, resamples=300)
    assert lo == hi == 1.0
    assert paired_test(scores, scores) == ("mcnemar-exact", 1.0)


def test_mcnemar_exact_against_a_hand_computed_value():
    # 6 discordant pairs, all against the compressed model: p = 2 * (1/2)^6 = 1/32
    base = [1.0] * 6 + [1.0, 0.0]
    comp = [0.0] * 6 + [1.0, 0.0]
    assert mcnemar_exact(base, comp) == pytest.approx(2 / 64)
    # 1 vs 2 discordant: p = 2 * (C(3,0) + C(3,1)) / 8 = 1.0
    assert mcnemar_exact([1, 0, 0, 1], [0, 1, 1, 1]) == pytest.approx(1.0)


def test_bootstrap_interval_covers_the_point_estimate_and_narrows_with_more_items():
    base = [1.0, 1.0, 0.0, 1.0] * 10
    comp = [1.0, 0.0, 0.0, 1.0] * 10
    lo, hi = bootstrap_ci(base, comp, mean_ratio, resamples=500)
    assert lo < mean_ratio(base, comp) < hi
    lo2, hi2 = bootstrap_ci(base * 10, comp * 10, mean_ratio, resamples=500)
    assert hi2 - lo2 < hi - lo


def test_permutation_test_detects_a_consistent_shift():
    base = [10.0 + 0.1 * i for i in range(30)]
    shifted = [x + 1.0 for x in base]
    assert paired_permutation(base, shifted, resamples=2000) < 0.01
    assert paired_test(base, base)[1] == 1.0
    assert paired_test(base, shifted)[0] == "paired-permutation"
    assert not math.isnan(paired_permutation(base, [x + 0.01 * (-1) ** i for i, x in enumerate(base)]))


def test_a_base_that_scores_nothing_is_flagged(tmp_path):
    from repskip.verify.run import ItemCache, _summary
    from repskip.benchmark import Benchmark, Item

    class Zero(Benchmark):
        primary_metric = "pass@1"

        def load(self, source=None):
            return []

    items = [Item(str(i), "", None) for i in range(3)]
    caches = []
    for label in ("b", "c"):
        cache = ItemCache(tmp_path / label, "x")
        cache.add([{"id": it.id, "metrics": {"pass@1": 0.0}} for it in items])
        caches.append(cache)
    summary = _summary(Zero(), items, *caches)
    assert summary["retention"] == 1.0 and summary["uninformative"]
