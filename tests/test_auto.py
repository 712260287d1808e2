"""--strategy auto: the similarity strategies' proposals, each repaired and scored on held-out
calibration text; the lowest loss wins, every candidate is recorded, and a rerun under the
same seed makes the same choice."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from helpers import calibration_loss, make_checkpoint, pruned_copy
from repskip import pipeline
from repskip.analyze import auto
from repskip.analyze.analysis import Analysis
from repskip.analyze.objective import Objective
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.repair.fit import calibration_batches
from repskip.repair.sweep import fit_linear_layerwise, fit_linear_many


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _setup(path, kind="nll", samples=8, length=24):
    from repskip.analyze import calibration

    handle = pipeline.open_model(path)
    model = handle.load()
    tokenizer = handle.family.load_tokenizer(path)
    calib = calibration.build(tokenizer, None, num_samples=samples, max_length=length)
    pad = tokenizer.pad_token_id
    scored = calibration_batches(calib.sequences[:4], 4, pad)
    rest = calibration_batches(calib.sequences[4:], 4, pad)
    return handle, model, scored, rest, Objective(handle.family, kind)


@pytest.fixture(scope="module")
def identity_pair(tmp_path_factory):
    """A tiny Llama whose layers 2 and 3 add nothing (attention and MLP outputs zeroed): removing
    both leaves the model's predictions exactly as they were, and every other removal changes
    them."""
    path = make_checkpoint(tmp_path_factory.mktemp("auto") / "llama", "llama", seed=5)
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    for layer in (2, 3):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            weights[f"model.layers.{layer}.{name}"].zero_()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("repair", [False, True])
def test_auto_takes_the_lowest_loss_not_the_first_proposal(identity_pair, repair):
    # the answer is known by construction: with the KL to the full model as the loss, the
    # removal of the two idle layers scores what the full model scores and any other removal more; it is
    # proposed last, so the choice is made by the scores, not by the order of the proposals
    handle, model, scored, rest, objective = _setup(identity_pair, "kl")
    # (no proposal's repair folds into an idle layer: its MLP output is zero, and no map can be fitted to it)
    proposals = [([1, 2], ["block-influence"]), ([1, 5], ["angular-block"]), ([2, 3], ["paper"])]
    calls = []
    record = auto.choose(model, handle.family, proposals, batches=scored, fit_batches=rest, objective=objective,
                         repair=repair, ridge=1e-3, progress=lambda done, total: calls.append((done, total)))
    # the progress counts every stage, the scoring and the check included, and ends complete
    assert len({total for _, total in calls}) == 1 and calls[-1][0] == calls[-1][1]
    assert [done for done, _ in calls] == sorted(done for done, _ in calls) and len(calls) >= 2
    losses = {tuple(c["remove"]): c["loss"] for c in record["candidates"]}
    # (the KL's reference log-probs are kept in float16: the full model's KL to itself is ~1e-5, not 0)
    assert record["base_loss"] < 1e-4 and losses[(2, 3)] == pytest.approx(record["base_loss"], rel=1e-3)
    assert min(losses[(1, 2)], losses[(1, 5)]) > 1e-3
    assert record["chosen"] == [2, 3]
    assert [c["proposed_by"] for c in record["candidates"]] == [["block-influence"], ["angular-block"], ["paper"]]
    assert all(c["fit_seconds"] >= 0 for c in record["candidates"]) and record["tokens"] > 0
    if repair:  # only the winner is checked; an idle run needs no map: the check keeps none
        assert record["candidates"][2]["maps_kept"] == {"1": False}
        assert record["candidates"][0]["maps_kept"] is None and record["candidates"][1]["maps_kept"] is None


@pytest.mark.parametrize("repair", [False, True])
def test_every_score_is_the_loss_of_the_model_reallypruned_copy(tiny, repair):
    # each candidate scored in the one layer-by-layer sweep equals the NLL of a copy with its
    # layers really removed and its maps really folded, on the held-out text: the maps as
    # fitted, and for the winner the maps the final fit's check keeps
    handle, model, scored, rest, objective = _setup(tiny["qwen2"])
    proposals = [([2, 3], ["a"]), ([1, 4], ["b"]), ([3], ["c"])]
    record = auto.choose(model, handle.family, proposals, batches=scored, fit_batches=rest, objective=objective,
                         repair=repair, ridge=1e-3)
    assert record["base_loss"] == pytest.approx(calibration_loss(model, scored, objective), rel=1e-5)
    removals = [r for r, _ in proposals]
    fitted = fit_linear_many(model, handle.family, rest, objective, removals, handle.num_layers, check=False) \
        if repair else [None] * 3
    truth = {tuple(r): calibration_loss(pruned_copy(handle, model, r, f.maps if f else {}), scored, objective)
             for r, f in zip(removals, fitted)}
    chosen = tuple(record["chosen"])
    if repair:
        checked = fit_linear_layerwise(model, handle.family, rest, objective, list(chosen), handle.num_layers).maps
        truth[chosen] = calibration_loss(pruned_copy(handle, model, list(chosen), checked), scored, objective)
    for c in record["candidates"]:
        assert c["loss"] == pytest.approx(truth[tuple(c["remove"])], rel=1e-4)
        assert (c["maps_kept"] is not None) == (repair and tuple(c["remove"]) == chosen)
    assert chosen == min(truth, key=truth.get)


def test_a_winner_whose_maps_the_check_drops_is_scored_again_without_them(tiny, monkeypatch):
    # as in the loss search, no candidate wins on maps the recipe will not have: with a check
    # that keeps no map, each winner in turn is scored unrepaired until one stays the lowest
    import repskip.repair.sweep as sweep

    monkeypatch.setattr(sweep, "choose_map", lambda ls, ridge, measure: ("none", None, {"none": 0.0}))
    handle, model, scored, rest, objective = _setup(tiny["qwen2"])
    proposals = [([2, 3], ["a"]), ([1, 4], ["b"]), ([3], ["c"]), ([2], ["d"])]
    record = auto.choose(model, handle.family, proposals, batches=scored, fit_batches=rest, objective=objective,
                         repair=True, ridge=1e-3)
    winner = next(c for c in record["candidates"] if c["remove"] == record["chosen"])
    assert winner["maps_kept"] and not any(winner["maps_kept"].values())
    assert winner["loss"] == pytest.approx(calibration_loss(pruned_copy(handle, model, winner["remove"]), scored, objective), rel=1e-4)
    assert "loss_as_fitted" in winner  # scored again: the check changed its maps
    assert winner["loss"] == min(c["loss"] for c in record["candidates"])
    for c in record["candidates"]:  # every candidate checked lost its maps and was scored without them
        assert c["maps_kept"] is None or ("loss_as_fitted" in c and not any(c["maps_kept"].values()))


def _analysis(tiny, tmp_path):
    runs = tmp_path / "a"
    assert run("analyze", tiny["qwen2"], "-o", runs, "--strategy", "block-influence", "--repair", "none",
               "--num-samples", "4", "--max-length", "16").exit_code == 0
    return Analysis.from_dict(json.loads((runs / "analysis.json").read_text()), "analysis.json")


def test_the_proposals_are_each_strategy_and_the_blocks_beside_the_angular_one(tiny, tmp_path):
    from repskip.analyze.selection import select

    analysis = _analysis(tiny, tmp_path)
    rules = dict(threshold=-1.0, allow_adjacent=None, protect_first=True, protect_last=True, protect=[])
    proposals, declined = auto.candidates(analysis, 2, repair=True, **rules)
    by = {name: remove for remove, names in proposals for name in names}
    for strategy in ("paper", "block-influence", "angular-block"):
        assert by[strategy] == select(analysis, strategy, 2, **rules).remove
    start = by["angular-block"][0]
    for shift, name in ((-1, "angular-block, one layer earlier"), (1, "angular-block, one layer later")):
        block = [start + shift, start + shift + 1]
        assert (name in by) == (block[0] >= 1 and block[1] <= 4)  # layers 0 and 5 are protected
        if name in by:
            assert by[name] == block
    assert len({tuple(r) for r, _ in proposals}) == len(proposals)  # equal removals are one candidate
    assert declined == {}
    # paper's threshold lets no layer qualify: it proposes nothing, and says why
    proposals, declined = auto.candidates(analysis, 2, repair=True, **{**rules, "threshold": 1.0})
    assert "paper" in declined and "qualify" in declined["paper"]
    assert all("paper" not in names for _, names in proposals)
    # without protection of layer 0, every proposal of 5 layers of 6 but the last removes it, and a
    # repaired removal of layer 0 cannot be proposed (no layer in front to take its map)
    with pytest.raises(RepskipError, match="no strategy proposes"):
        auto.candidates(analysis, 5, repair=True, **{**rules, "protect_first": False})


def test_analyze_auto_records_every_candidate_and_is_reproducible(tiny, tmp_path):
    args = ["--num-samples", "8", "--max-length", "24", "--search-samples", "4", "-k", "2"]
    records = []
    for name in ("one", "two"):
        res = run("analyze", tiny["llama"], "-o", tmp_path / name, *args)  # auto and the repair: the defaults
        assert res.exit_code == 0, res.output
        assert "auto: candidates scored on" in res.output
        records.append(json.loads((tmp_path / name / "analysis.json").read_text())["auto"])
    one, two = records
    for record in records:
        for c in record["candidates"]:
            c.pop("fit_seconds")
            c.pop("check_seconds", None)
        for key in ("seconds", "score_seconds"):
            record.pop(key)
    assert one == two  # the same seed: the same candidates, losses and choice
    assert one["k"] == 2 and one["repair"] and one["sequences"] == 4
    best = min(one["candidates"], key=lambda c: c["loss"])
    assert one["chosen"] == best["remove"]
    recipe = yaml.safe_load((tmp_path / "one" / "recipe.yaml").read_text())
    assert recipe["selection"]["strategy"] == "auto"
    assert recipe["resolved"]["remove"] == sorted(best["remove"])
    assert [c["remove"] for c in recipe["resolved"]["candidates"]] == [c["remove"] for c in one["candidates"]]
    assert recipe["resolved"]["repair"]["maps"]  # the chosen removal's final fit, on all the calibration text
    # the same folder and settings: reused, not weighed again
    res = run("analyze", tiny["llama"], "-o", tmp_path / "one", *args)
    assert res.exit_code == 0 and "reusing the auto choice" in res.stderr
    # select replays the record at its own k and rules only
    res = run("select", tmp_path / "one", "-o", tmp_path / "same.yaml", "--strategy", "auto", "-k", "2")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "same.yaml").read_text())["resolved"]["remove"] == recipe["resolved"]["remove"]
    for other in (["-k", "3"], ["-k", "2", "--protect", "2"]):
        res = run("select", tmp_path / "one", "-o", tmp_path / "x.yaml", "--strategy", "auto", *other)
        assert res.exit_code == 1 and "auto choice was made with other settings" in res.stderr


def test_an_unresolved_auto_recipe_resolves_in_compress(tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("schema_version: 1\nselection: {strategy: auto, k: 2, repair: linear, search_samples: 4}\n"
                      "calibration: {num_samples: 8, max_length: 16}\n")
    res = run("compress", tiny["qwen2"], "--recipe", preset, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    written = yaml.safe_load((tmp_path / "out" / "repskip-recipe.yaml").read_text())
    assert len(written["resolved"]["remove"]) == 2 and written["resolved"]["candidates"]
    assert written["resolved"]["remove"] in [sorted(c["remove"]) for c in written["resolved"]["candidates"]]
    # the card says which strategy's proposal won
    chosen = next(c for c in written["resolved"]["candidates"] if sorted(c["remove"]) == written["resolved"]["remove"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert (f"| strategy | auto, k=2 ({', '.join(chosen['proposed_by'])}'s proposal, the lowest calibration loss of "
            f"{len(written['resolved']['candidates'])} candidates) |") in card
