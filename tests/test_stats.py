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
    from repskip.verify.cache import ItemCache
    from repskip.verify.report import summary as summarize
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
    summary = summarize(Zero(), items, *caches)
    assert summary["retention"] == 1.0 and summary["uninformative"]


def test_power_matches_the_normal_approximation_and_needs_variation():
    from statistics import NormalDist

    from repskip.verify.stats import items_for_power

    diffs = [1.0, -1.0] * 50  # sd = 1.005 (n - 1 in the variance)
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    sd = (100 / 99) ** 0.5
    assert items_for_power(diffs, 0.1) == math.ceil((z * sd / 0.1) ** 2)  # 789
    assert items_for_power(diffs, 0.2) < items_for_power(diffs, 0.1)  # a larger effect needs fewer
    assert items_for_power([0.0] * 10, 0.1) is None  # items that never disagree: no estimate
    assert items_for_power(diffs, 0.0) is None


def test_wide_intervals_and_a_weak_base_are_flagged_with_the_items_needed():
    from repskip.verify.stats import informative

    base = [1.0] * 3 + [0.0] * 21  # 3 of 24 right, as GSM8K on a 0.5B chat model
    comp = [1.0, 0.0, 0.0] + [0.0] * 20 + [1.0]
    check = informative(base, comp, 3 / 24, (0.0, 1.3), True, 0.05 * 3 / 24)
    assert check["uninformative"]
    assert "3 item(s) right" in check["why"] and "1.30 wide" in check["why"]
    assert check["items_needed"] > 1000  # a 5% loss of a 12.5% base is a tiny paired difference
    strong = [1.0] * 150 + [0.0] * 50
    same = list(strong)
    same[0], same[-1] = 0.0, 1.0
    check = informative(strong, same, 0.75, (0.97, 1.03), True, 0.05 * 0.75)
    assert not check["uninformative"] and check["why"] == ""
