"""The cosine repair (--repair cosine): a map fitted to the direction of each token's target,
started from the least-squares map, recorded and folded like the linear one."""

from __future__ import annotations

import numpy as np
import yaml
from click.testing import CliRunner

from repskip.cli import main
from repskip.repair import cosine
from repskip.repair.cosine import CosineFit
from repskip.repair.linear import LeastSquares


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _distance(m, d, t):
    mt = m @ t
    return float(np.mean(1 - (mt * d).sum(1) / (np.linalg.norm(mt, axis=1) * np.linalg.norm(d, axis=1))))


def _data(tokens=600, hidden=12, seed=0):
    """Targets whose directions a map gives exactly, with sizes it cannot: each token's target
    is m A times a scale that grows with m's first coordinate (least squares chases the big
    ones, and the scale's dependence on m bends its map away from A)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(tokens, hidden))
    a = np.eye(hidden) + 0.5 * rng.normal(size=(hidden, hidden))
    d = (m @ a) * np.exp(1.5 * m[:, :1])
    return m, d, a


def test_the_cosine_fit_finds_the_directions_least_squares_misses():
    m, d, _ = _data()
    fit, ls = CosineFit(m.shape[1]), LeastSquares(m.shape[1])
    for chunk in range(0, len(m), 100):  # streamed in batches, as the fits add them
        fit.add(m[chunk:chunk + 100], d[chunk:chunk + 100])
        ls.add(m[chunk:chunk + 100], d[chunk:chunk + 100])
    least, cos = ls.solve(1e-6), fit.solve(1e-6)
    assert fit.tokens == ls.tokens == len(m) and (fit.mtm == ls.mtm).all()
    assert _distance(m, d, cos) < 1e-6 and _distance(m, d, least) > 0.05
    assert fit.residual(cos) == ls.residual(cos)  # reported on the least-squares error, like any map


def test_where_sizes_hold_no_distortion_the_cosine_map_is_the_least_squares_map():
    # the cosine cannot see T's size; a ridge in the loss used to shrink it for free
    rng = np.random.default_rng(3)
    m = rng.normal(size=(600, 12))
    a = np.eye(12) + 0.5 * rng.normal(size=(12, 12))
    fit = CosineFit(12)
    fit.add(m, m @ a)
    cos = fit.solve(1e-3)
    assert np.abs(cos - a).max() < 1e-2
    assert fit.residual(cos) < 1e-4


def test_the_cosine_map_has_the_size_of_least_error_along_its_direction():
    m, d, _ = _data(seed=4)
    w = np.random.default_rng(4).uniform(0.5, 2.0, size=len(m))
    fit = CosineFit(m.shape[1])
    fit.add(m, d, w)
    cos = fit.solve(1e-3)
    assert _distance(m, d, cos) < 1e-6
    # no other size of the same map fits the tokens (weighted, ridged as least squares) better
    lam = 1e-3 * np.trace(fit.mtm) / m.shape[1]
    err = lambda a: float((w * ((a * m @ cos - d) ** 2).sum(1)).sum() + lam * ((a * cos - np.eye(len(cos))) ** 2).sum())  # noqa: E731
    assert err(1.0) <= min(err(0.9), err(1.1), err(0.99), err(1.01))


def test_a_strong_ridge_pulls_the_cosine_map_to_no_repair():
    m, d, _ = _data(seed=1)
    fit = CosineFit(m.shape[1])
    fit.add(m, d)
    weak, strong = fit.solve(1e-6), fit.solve(1e3)
    eye = np.eye(m.shape[1])
    assert np.abs(strong - eye).max() < 0.05 < np.abs(weak - eye).max()


def test_past_the_cap_a_seeded_sample_of_rows_is_kept(monkeypatch):
    monkeypatch.setattr(cosine, "MAX_TOKENS", 250)
    m, d, _ = _data(seed=2)
    fits = [CosineFit(m.shape[1]) for _ in range(2)]
    for fit in fits:
        for chunk in range(0, len(m), 100):
            fit.add(m[chunk:chunk + 100], d[chunk:chunk + 100])
    kept = [np.concatenate(f._m) for f in fits]
    assert len(kept[0]) == 250 and fits[0].tokens == len(m)  # the sums still see every token
    assert (kept[0] == kept[1]).all()  # the same seed: the same rows
    assert (kept[0][:200] == m[:200].astype(np.float32)).all()  # the first rows while there is room


def test_analyze_and_compress_with_the_cosine_repair(tiny, tmp_path):
    res = run("analyze", tiny["llama"], "-o", tmp_path / "a", "--strategy", "block-influence", "-k", "2",
              "--repair", "cosine", "--num-samples", "8", "--max-length", "24")
    assert res.exit_code == 0, res.output
    recipe = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert recipe["selection"]["repair"] == "cosine" and recipe["resolved"]["repair"]["method"] == "cosine"
    linear = run("analyze", tiny["llama"], "-o", tmp_path / "b", "--strategy", "block-influence", "-k", "2",
                 "--repair", "linear", "--num-samples", "8", "--max-length", "24")
    assert linear.exit_code == 0
    other = yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())
    assert other["resolved"]["remove"] == recipe["resolved"]["remove"]
    assert other["resolved"]["repair"]["sha256"] != recipe["resolved"]["repair"]["sha256"]  # another map
    res = run("compress", tiny["llama"], "--recipe", tmp_path / "a" / "recipe.yaml", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    written = yaml.safe_load((tmp_path / "out" / "repskip-recipe.yaml").read_text())
    assert written["resolved"]["repair"]["method"] == "cosine"
    assert "cosine map folded into the weights" in (tmp_path / "out" / "README.md").read_text()


def test_the_loss_strategies_refuse_the_cosine_repair_before_any_work(tiny, tmp_path):
    from helpers import one_line_error

    for strategy in ("loss", "greedy-loss"):
        res = run("analyze", tiny["llama"], "-o", tmp_path / strategy, "--strategy", strategy, "--repair", "cosine")
        one_line_error(res, "--repair cosine is not available with --strategy " + strategy)
        assert not (tmp_path / strategy).exists()
    preset = tmp_path / "p.yaml"
    preset.write_text("schema_version: 1\nselection: {strategy: greedy-loss, k: 2, repair: cosine}\n")
    one_line_error(run("compress", tiny["llama"], "--recipe", preset, "-o", tmp_path / "out"),
                   "--repair cosine is not available")
