import math

import pytest

from repskip.analyze.analysis import Analysis
from repskip.errors import RepskipError
from repskip.analyze.selection import select


def fake_analysis(cosines, last_matrix=None):
    L = len(cosines)
    layers = [{"layer": i, "cosine_mean": c, "block_influence": 1 - c} for i, c in enumerate(cosines)]
    identity = [[1.0 if i == j else 0.5 for j in range(L + 1)] for i in range(L + 1)]
    groups = {
        "tokens": {"layers": layers, "similarity_matrix": identity},
        "last_token": {"layers": layers, "similarity_matrix": last_matrix or identity},
    }
    return Analysis({"model": {"num_layers": L}, "primary_group": "tokens", "groups": groups})


#          0     1     2     3     4     5     6     7
COS = [0.10, 0.97, 0.99, 0.98, 0.90, 0.96, 0.995, 0.50]


def test_paper_takes_most_similar_first_and_never_two_adjacent():
    # ranking: 6 (0.995), 2 (0.99), 3 (0.98, adjacent to 2: skipped), 1 (0.97, adjacent to 2), 5 (0.96, adjacent to 6)
    assert select(fake_analysis(COS), "paper", 2).remove == [2, 6]
    with pytest.raises(RepskipError, match="only 2 layer"):
        select(fake_analysis(COS), "paper", 3)


def test_paper_threshold_and_adjacency_are_overridable():
    assert select(fake_analysis(COS), "paper", 4, allow_adjacent=True).remove == [1, 2, 3, 6]
    assert select(fake_analysis(COS), "paper", 3, threshold=0.85).remove == [2, 4, 6]
    with pytest.raises(RepskipError, match="lower --threshold"):
        select(fake_analysis(COS), "paper", 1, threshold=0.999)


def test_first_and_last_layers_are_protected_unless_released():
    cos = [0.999, 0.5, 0.5, 0.999]
    with pytest.raises(RepskipError):
        select(fake_analysis(cos), "paper", 1)
    assert select(fake_analysis(cos), "paper", 2, protect_first=False, protect_last=False).remove == [0, 3]
    assert select(fake_analysis(COS), "paper", 1, protect=[6]).remove == [2]
    assert select(fake_analysis(COS), "paper", 1, protect=[-2]).remove == [2]


def test_block_influence_removes_lowest_influence_and_allows_adjacent():
    assert select(fake_analysis(COS), "block-influence", 3).remove == [2, 3, 6]
    # greedy by BI: 6, 2, then 3, 1 and 5 are adjacent to a chosen layer, so 4
    assert select(fake_analysis(COS), "block-influence", 3, allow_adjacent=False).remove == [2, 4, 6]


def test_angular_block_picks_the_contiguous_block_with_smallest_distance():
    L = 6
    # state i vs state i+2: block starting at 3 (layers 3, 4) is the closest
    m = [[1.0 if i == j else 0.2 for j in range(L + 1)] for i in range(L + 1)]
    m[3][5] = m[5][3] = 0.9
    m[1][3] = m[3][1] = 0.8
    sel = select(fake_analysis([0.5] * L, last_matrix=m), "angular-block", 2)
    assert sel.remove == [3, 4]
    assert sel.scores[3] == pytest.approx(math.acos(0.9) / math.pi)
    assert sel.group == "last_token"
    # with the mean of per-sequence angles available, that is what is ranked
    analysis = fake_analysis([0.5] * L, last_matrix=m)
    angles = [[0.5] * (L + 1) for _ in range(L + 1)]
    angles[1][3] = 0.1
    analysis.data["groups"]["last_token"]["angular_distance_matrix"] = angles
    assert select(analysis, "angular-block", 2).remove == [1, 2]


def test_k_must_leave_a_layer():
    with pytest.raises(RepskipError, match="would remove every layer"):
        select(fake_analysis(COS), "paper", 8)
    with pytest.raises(RepskipError, match="unknown strategy"):
        select(fake_analysis(COS), "magic", 1)
