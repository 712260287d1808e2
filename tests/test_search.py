"""Loss-aware selection: every trial's loss equals the loss of the model with those layers
really removed (and repaired), although trials replay the states in front of the candidate;
greedy rounds build on each other; select re-reads a recorded search."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from helpers import calibration_loss, llada_from_llama, make_checkpoint, pruned_copy
from repskip import pipeline
from repskip.analyze.objective import Objective
from repskip.analyze.search import search
from repskip.cli import main
from repskip.repair.fit import calibration_batches, fit_linear


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _setup(path, samples=6, length=24):
    handle = pipeline.open_model(path)
    model = handle.load()
    tokenizer = handle.family.load_tokenizer(path)
    from repskip.analyze import calibration

    calib = calibration.build(tokenizer, None, num_samples=samples, max_length=length)
    pad = tokenizer.pad_token_id
    mask_id = handle.family.mask_token_id(handle.ckpt.config) if handle.family.generative_kind == "diffusion" else None
    return handle, model, calibration_batches(calib.sequences, 4, pad), Objective(handle.family, mask_id=mask_id)


@pytest.fixture(scope="module")
def llada(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("search-llada")
    llama = make_checkpoint(root / "llama", "llama", seed=31, tie_word_embeddings=False)
    return llada_from_llama(llama, root / "llada")


@pytest.mark.parametrize("name", ["qwen2", "llada"])
def test_greedy_trials_equal_the_really_pruned_model(tiny, llada, name):
    path = llada if name == "llada" else tiny[name]
    handle, model, batches, objective = _setup(path)
    result = search(model, handle.family, batches, objective, strategy="greedy-loss", k=2, protected={0, 5})
    assert result.base_loss == pytest.approx(calibration_loss(model, batches, objective), rel=1e-5)
    first, second = result.rounds
    assert first.removed == [] and sorted(first.losses) == [1, 2, 3, 4]
    for c, loss in first.losses.items():
        assert loss == pytest.approx(calibration_loss(pruned_copy(handle, model, [c]), batches, objective), rel=1e-4)
    assert first.chosen == [min(first.losses, key=first.losses.get)]
    assert second.removed == first.chosen and first.chosen[0] not in second.losses
    for c, loss in second.losses.items():
        both = sorted([*first.chosen, c])
        assert loss == pytest.approx(calibration_loss(pruned_copy(handle, model, both), batches, objective), rel=1e-4)


def test_repaired_trials_equal_the_repaired_model(tiny):
    handle, model, batches, objective = _setup(tiny["llama"])
    result = search(model, handle.family, batches, objective, strategy="loss", k=2, protected={0, 5}, repair=True)
    for c, loss in result.rounds[0].losses.items():
        fit = fit_linear(model, handle.family, batches, objective, [c], handle.num_layers)
        repaired = calibration_loss(pruned_copy(handle, model, [c], fit.maps), batches, objective)
        plain = calibration_loss(pruned_copy(handle, model, [c]), batches, objective)
        assert loss == pytest.approx(repaired, rel=1e-4) and loss != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("name", ["llama", "llada"])
def test_the_chosen_layer_is_scored_with_the_repair_the_fit_keeps(tiny, llada, name):
    # the final fit checks each map (it must bring the predictions closer to the full model's)
    # and may drop it; the search's choice is scored with what that check keeps
    path = llada if name == "llada" else tiny[name]
    handle, model, batches, objective = _setup(path)
    result = search(model, handle.family, batches, objective, strategy="greedy-loss", k=1, protected={0, 5},
                    repair=True)
    (c,) = result.rounds[0].chosen
    assert set(result.rounds[0].checked) == {c}
    fit = fit_linear(model, handle.family, batches, objective, [c], handle.num_layers)
    assert (result.rounds[0].checked[c] == "none") == (not fit.maps)
    final = calibration_loss(pruned_copy(handle, model, [c], fit.maps), batches, objective)
    assert result.rounds[0].losses[c] == pytest.approx(final, rel=1e-4)


def test_a_map_the_check_drops_is_not_scored(tiny, monkeypatch):
    import repskip.analyze.search as search_module

    handle, model, batches, objective = _setup(tiny["llama"])
    repaired = search(model, handle.family, batches, objective, strategy="greedy-loss", k=1, protected={0, 5},
                      repair=True).rounds[0].losses
    monkeypatch.setattr(search_module, "check_map", lambda *a, **k: ("none", None, {}))
    result = search(model, handle.family, batches, objective, strategy="greedy-loss", k=2, protected={0, 5},
                    repair=True)
    first, second = result.rounds
    for r in result.rounds:
        assert set(r.chosen) <= set(r.checked) and all(v == "none" for v in r.checked.values())
        (c,) = r.chosen
        assert r.losses[c] == min(r.losses.values())  # chosen on the loss it really has
    (c,) = first.chosen
    plain = calibration_loss(pruned_copy(handle, model, [c]), batches, objective)
    assert first.losses[c] == pytest.approx(plain, rel=1e-4)
    for d in first.checked:  # each candidate checked was scored again, unrepaired
        unrepaired = calibration_loss(pruned_copy(handle, model, [d]), batches, objective)
        assert first.losses[d] == pytest.approx(unrepaired, rel=1e-4) != pytest.approx(repaired[d], rel=1e-4)
    (d,) = second.chosen  # the first round's layer carries no map into the second
    both = calibration_loss(pruned_copy(handle, model, sorted([c, d])), batches, objective)
    assert second.losses[d] == pytest.approx(both, rel=1e-4)


def test_one_shot_loss_takes_the_cheapest_under_the_adjacency_rule(tiny):
    handle, model, batches, objective = _setup(tiny["llama"])
    free = search(model, handle.family, batches, objective, strategy="loss", k=2, protected={0, 5})
    losses = free.rounds[0].losses
    assert free.rounds[0].chosen == sorted(losses, key=losses.get)[:2]
    apart = search(model, handle.family, batches, objective, strategy="loss", k=2, protected={0, 5},
                   allow_adjacent=False)
    a, b = apart.rounds[0].chosen
    assert abs(a - b) > 1


def test_kl_to_itself_is_zero(tiny):
    handle, model, batches, _ = _setup(tiny["llama"])
    objective = Objective(handle.family, "kl")
    result = search(model, handle.family, batches, objective, strategy="loss", k=1, protected={0, 5})
    assert abs(result.base_loss) < 1e-3 and all(v > 0 for v in result.rounds[0].losses.values())


def test_analyze_records_the_search_and_select_rereads_it(tiny, tmp_path):
    runs = tmp_path / "runs"
    res = run("analyze", tiny["qwen2"], "-o", runs, "--strategy", "greedy-loss", "-k", "3", "--num-samples", "6",
              "--max-length", "24", "--search-samples", "4")
    assert res.exit_code == 0, res.output
    assert "loss search (nll, repaired): full model" in res.output  # analyze repairs by default
    data = json.loads((runs / "analysis.json").read_text())["search"]
    assert data["strategy"] == "greedy-loss" and len(data["rounds"]) == 3 and data["sequences"] == 4
    assert data["repair"] and data["fit_sequences"] == 2  # trial maps fitted on the sequences not scored
    path = sorted(r["chosen"][0] for r in data["rounds"])
    assert yaml.safe_load((runs / "recipe.yaml").read_text())["resolved"]["remove"] == path
    res = run("select", runs, "-o", tmp_path / "k2.yaml", "--strategy", "greedy-loss", "-k", "2")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "k2.yaml").read_text())["resolved"]["remove"] == \
        sorted(r["chosen"][0] for r in data["rounds"][:2])
    res = run("select", runs, "-o", tmp_path / "k4.yaml", "--strategy", "greedy-loss", "-k", "4")
    assert res.exit_code == 1 and "went 3 round(s) deep" in res.stderr
    res = run("select", runs, "-o", tmp_path / "bi.yaml", "--strategy", "loss", "-k", "2")
    assert res.exit_code == 1 and "searched with greedy-loss" in res.stderr


def test_select_without_a_search(tiny, tmp_path):
    runs = tmp_path / "runs"
    assert run("analyze", tiny["qwen2"], "-o", runs, "-k", "1", "--threshold", "-1", "--num-samples", "4",
               "--max-length", "16").exit_code == 0
    res = run("select", runs, "-o", tmp_path / "r.yaml", "--strategy", "loss", "-k", "1")
    assert res.exit_code == 1 and "holds no loss search" in res.stderr


def test_an_unresolved_loss_recipe_resolves_in_compress(tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("schema_version: 1\nselection: {strategy: loss, k: 2, repair: linear, search_samples: 4}\n"
                      "calibration: {num_samples: 4, max_length: 16}\n")
    res = run("compress", tiny["llama"], "--recipe", preset, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    written = yaml.safe_load((tmp_path / "out" / "repskip-recipe.yaml").read_text())
    assert len(written["resolved"]["remove"]) == 2 and "file" not in written["resolved"]["repair"]
