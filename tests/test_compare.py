"""`repskip compare`: series grouped by model, the views they share, the table's numbers on
hand-made analyses and reports, the figures, and one-line refusals."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from repskip.cli import main
from repskip.compare import common_views, load_series, summary


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def analysis(folder: Path, cosines: list[float], fingerprint: str, family: str = "hf-decoder",
             matrix: bool = True, profile: bool = True) -> Path:
    n = len(cosines)
    group = {"tokens": 100, "layers": [{"layer": i, "cosine_mean": c, "cosine_std": 0.01,
                                        "angular_distance_mean": 0.1, "block_influence": 1 - c}
                                       for i, c in enumerate(cosines)]}
    if matrix:
        group["similarity_matrix"] = [[1.0 if i == j else 0.5 for j in range(n + 1)] for i in range(n + 1)]
    data = {"schema_version": 1, "kind": "repskip.analysis",
            "model": {"path": f"/models/{folder.name}", "family": family, "model_type": "x",
                      "fingerprint": fingerprint, "num_layers": n, "format": "safetensors"},
            "calibration": {"source": "builtin", "hash": "sha256:0", "sequences": 4, "tokens": 100, "max_length": 32},
            "settings": {"mode": "forward"}, "primary_group": "tokens", "groups": {"tokens": group},
            "versions": {"repskip": "0"}}
    if profile:
        data["token_distance_profile"] = {"state": "layer output", "distances": [1, 2, 4], "pairs": [9, 8, 6],
                                          "similarity": [[0.5, 0.4, 0.3]] * n}
    folder.mkdir(parents=True)
    (folder / "analysis.json").write_text(json.dumps(data))
    return folder


def report(folder: Path, fingerprint: str, layers: int, kept: int, retention: float) -> Path:
    data = {"schema_version": 1, "kind": "repskip.verify",
            "base": {"path": "/models/m", "layers": layers, "fingerprint": fingerprint},
            "compressed": {"path": "/x", "layers": kept},
            "benchmarks": {"arc_easy": {"retention": retention, "retention_ci95": [retention - 0.05, retention + 0.05]}}}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def runs(tmp_path):
    a = analysis(tmp_path / "ar", [0.1, 0.9, 0.97, 0.96, 0.5, 0.2], "sha256:a")
    d = analysis(tmp_path / "diff", [0.2, 0.99, 0.98, 0.3], "sha256:d", family="llada")
    reports = [report(tmp_path / "ra4", "sha256:a", 6, 4, 0.7), report(tmp_path / "ra2", "sha256:a", 6, 5, 0.9),
               report(tmp_path / "rd1", "sha256:d", 4, 3, 0.95)]
    return a, d, reports


def test_series_group_by_model_and_the_table_is_right(runs):
    a, d, reports = runs
    series = load_series([a, *reports, d], ["AR", "LLaDA"])
    assert [s.label for s in series] == ["AR", "LLaDA"]
    assert [p.removed for p in series[0].points] == [1, 2]  # sorted by k
    assert series[1].kind == "diffusion" and series[0].kind == "autoregressive"
    views = common_views(series)
    assert views == ["similarity", "matrix", "distance", "retention"]
    rows = summary(series, views)
    ar = rows[0]
    assert ar["layers"] == 6
    assert ar["mean_cosine"] == pytest.approx((0.9 + 0.97 + 0.96 + 0.5) / 4)  # first and last left out
    assert ar["redundant_share"] == pytest.approx(0.5)
    assert [m["layer"] for m in ar["most_redundant"]] == [2, 3, 1]
    assert ar["most_redundant"][0]["depth"] == pytest.approx(2 / 5)
    assert [p["fraction"] for p in ar["retention"]] == pytest.approx([1 / 6, 2 / 6])
    assert rows[1]["retention"][0]["benchmarks"]["arc_easy"]["retention"] == 0.95


def test_the_cli_writes_a_figure_per_view_and_the_json(runs, tmp_path):
    a, d, reports = runs
    out = tmp_path / "cmp"
    res = run("compare", a, d, *reports, "--label", "AR", "--label", "LLaDA", "-o", out)
    assert res.exit_code == 0, res.output
    record = json.loads((out / "compare.json").read_text())
    assert record["kind"] == "repskip.compare" and record["schema_version"] == 1
    assert record["views"] == ["similarity", "matrix", "distance", "retention"]
    for name in record["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AR" in res.output and "LLaDA" in res.output


def test_only_the_shared_views_are_drawn(tmp_path):
    a = analysis(tmp_path / "a", [0.1, 0.9, 0.2], "sha256:a", matrix=False)
    b = analysis(tmp_path / "b", [0.1, 0.8, 0.9, 0.2], "sha256:b", profile=False)
    out = tmp_path / "cmp"
    res = run("compare", a, b, "-o", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "compare.json").read_text())["views"] == ["similarity"]
    assert sorted(p.name for p in out.glob("*.png")) == ["compare_similarity.png"]


@pytest.mark.parametrize("case, message", [
    ("no-common", "share no view"),
    ("one-model", "at least two models"),
    ("labels", "--label given for 2 models"),
    ("not-ours", "neither a repskip analysis nor a verify report"),
    ("missing", "does not exist"),
    ("output-is-input", "refusing to write"),
])
def test_refusals_are_one_line(tmp_path, case, message):
    a = analysis(tmp_path / "a", [0.1, 0.9, 0.2], "sha256:a")
    b = analysis(tmp_path / "b", [0.1, 0.8, 0.2], "sha256:b")
    args = {
        "no-common": lambda: [a, report(tmp_path / "r", "sha256:other", 6, 5, 0.9)],
        "one-model": lambda: [a, report(tmp_path / "r", "sha256:a", 3, 2, 0.9)],
        "labels": lambda: [a, b, "--label", "only-one"],
        "not-ours": lambda: [a, tmp_path / "x.json"],
        "missing": lambda: [a, tmp_path / "nowhere"],
        "output-is-input": lambda: [a, b, "--force"],
    }[case]()
    (tmp_path / "x.json").write_text('{"kind": "something"}')
    res = run("compare", *args, "-o", a if case == "output-is-input" else tmp_path / "cmp")
    assert res.exit_code == 1, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "cmp").exists()
    assert json.loads((a / "analysis.json").read_text())["kind"] == "repskip.analysis"  # the input untouched


def test_real_analyses_of_an_ar_and_a_diffusion_model_compare(tiny, tmp_path):
    from helpers import llada_from_llama

    llada = llada_from_llama(tiny["llama"], tmp_path / "llada-model")
    for name, model in (("ar", tiny["llama"]), ("llada", llada)):
        res = run("analyze", model, "-o", tmp_path / name, "--num-samples", "4", "--max-length", "24", "-k", "1",
                  "--repair", "none")
        assert res.exit_code == 0, res.output
    res = run("compare", tmp_path / "ar", tmp_path / "llada", "-o", tmp_path / "cmp", "--json")
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert [m["family"] for m in record["models"]] == ["hf-decoder", "llada"]
    assert "similarity" in record["views"] and (tmp_path / "cmp" / "compare_similarity.png").is_file()
