"""The analysis plots: what they decide (axis and colour range, outlines) and that they draw."""

import math

import matplotlib.image as mpimg
import pytest

from repskip.analyze import plots
from repskip.analyze.analysis import Analysis

L = 10
#      0     1     2     3     4     5     6     7     8     9
COS = [0.83, 0.90, 0.92, 0.96, 0.97, 0.94, 0.91, 0.95, 0.93, 0.86]


def make_analysis(cos=COS, last=None):
    """A complete analysis dict, as ``from_dict`` accepts it, with cosines around 0.83-0.97."""
    n = len(cos)

    def group(values):
        rows = [{"layer": i, "cosine_mean": c, "cosine_std": 0.01, "cosine_min": c - 0.03, "cosine_max": min(1.0, c + 0.03),
                 "angular_distance_mean": math.acos(c) / math.pi, "block_influence": 1 - c}
                for i, c in enumerate(values)]
        # similarity decays with the number of layers between two states
        matrix = [[round(0.985 ** abs(i - j), 6) for j in range(n + 1)] for i in range(n + 1)]
        return {"tokens": 1000, "layers": rows, "similarity_matrix": matrix}

    data = {
        "kind": "repskip.analysis", "schema_version": 1,
        "model": {"num_layers": n, "fingerprint": "f" * 16, "family": "llama", "path": "/models/tiny-llama"},
        "calibration": {"source": "builtin", "hash": "h", "sequences": 4, "max_length": 32},
        "settings": {}, "versions": {}, "primary_group": "tokens",
        "groups": {"tokens": group(cos), "last_token": group(last or [c - 0.01 for c in cos])},
        "token_distance_profile": {"state": "layer output", "distances": [1, 2, 4, 8], "pairs": [9, 8, 6, 2],
                                   "similarity": [[0.9, 0.8, 0.7, 0.6] for _ in range(n)]},
    }
    return Analysis.from_dict(data)


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_similarity_axis_fits_the_data_not_zero_to_one():
    a = make_analysis()
    lo, hi = plots.similarity_ylim(a, protected=[])  # every layer: band 0.82 .. 0.98
    assert 0.8 <= lo < 0.82 and 0.98 < hi <= 1.0
    lo, hi = plots.similarity_ylim(a)  # first and last protected: layers 1..8, 0.89 .. 0.98
    assert 0.87 < lo < 0.89 and 0.98 < hi <= 1.0
    # the threshold widens the range only when it lies outside the data
    assert plots.similarity_ylim(a, 0.95) == (lo, hi)
    lo2, hi2 = plots.similarity_ylim(a, 0.99)
    assert lo2 == pytest.approx(lo, abs=0.01) and hi2 > 0.99
    # a flat curve still gets a visible range
    flat = make_analysis([0.9] * L, last=[0.9] * L)
    lo3, hi3 = plots.similarity_ylim(flat)
    assert lo3 < 0.89 and hi3 > 0.91 and hi3 - lo3 < 0.05


def test_a_far_off_protected_layer_does_not_squash_the_band(tmp_path):
    # the first layer of a real model often changes the state far more than the rest
    a = make_analysis([0.35] + COS[1:])
    lo, hi = plots.similarity_ylim(a)
    assert 0.8 < lo and hi <= 1.0
    assert plots.similarity_ylim(a, protected=[])[0] < 0.35  # unless it may be removed
    plots.consecutive_similarity(a, tmp_path / "s.png", 0.95, [3, 4, 7])
    assert_png(tmp_path / "s.png")


def test_removed_runs_boxes_cover_each_run_states():
    assert plots.removed_runs_boxes([3, 4, 7], L) == [(3, 5), (7, 8)]
    assert plots.removed_runs_boxes([7, 3, 4, 4], L) == [(3, 5), (7, 8)]
    assert plots.removed_runs_boxes([0, 9], L) == [(0, 1), (9, 10)]
    assert plots.removed_runs_boxes(None, L) == [] == plots.removed_runs_boxes([], L)
    with pytest.raises(ValueError, match="out of range"):
        plots.removed_runs_boxes([10], L)


def test_protected_defaults_to_first_and_last_layer():
    assert plots.default_protected(L) == [0, L - 1]
    assert plots.default_protected(1) == [0]


def test_layer_ticks_are_integers_and_readable():
    assert plots.layer_ticks(L) == list(range(L))
    assert plots.layer_ticks(40) == list(range(40))
    for n in (41, 64, 80, 126, 1000):
        ticks = plots.layer_ticks(n)
        assert ticks[0] == 0 and len(ticks) <= 30 and all(isinstance(t, int) for t in ticks)


def test_heatmap_colour_range_follows_the_data():
    a = make_analysis()
    vmin, vmax = plots.heatmap_range(a.matrix())
    assert vmax == 1.0 and 0.85 < vmin < 0.99  # the matrix spans 0.985**10 = 0.86 .. 1
    assert plots.heatmap_range([[1.0, 1.0], [1.0, 1.0]]) == (0.99, 1.0)
    # the embeddings and the final state, far from everything, do not set the floor
    m = [row[:] for row in a.matrix()]
    for i in range(L + 1):
        for j in (0, L):
            if i != j:
                m[i][j] = m[j][i] = 0.1
    assert plots.heatmap_range(m)[0] > 0.85


@pytest.mark.parametrize("threshold, chosen, protected", [
    (0.95, [3, 4, 7], None),
    (None, None, None),
    (0.9, [], []),
    (None, [2], [0, 1, -1]),
])
def test_plots_write_valid_pngs(tmp_path, threshold, chosen, protected):
    a = make_analysis()
    plots.consecutive_similarity(a, tmp_path / "similarity.png", threshold, chosen, protected=protected)
    plots.similarity_heatmap(a, tmp_path / "similarity_matrix.png", chosen)
    plots.token_distance_profile(a, tmp_path / "token_distance.png")
    for name in ("similarity.png", "similarity_matrix.png", "token_distance.png"):
        assert_png(tmp_path / name)


def test_old_call_signatures_still_work(tmp_path):
    a = make_analysis()
    plots.consecutive_similarity(a, tmp_path / "s.png", 0.95, [3])
    plots.similarity_heatmap(a, tmp_path / "m.png")
    assert_png(tmp_path / "s.png")
    assert_png(tmp_path / "m.png")
