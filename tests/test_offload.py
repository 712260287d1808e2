"""--offload: a model run one decoder layer at a time from disk gives what it gives in memory,
and the choice, the estimate and the offload folder refuse bad input in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from helpers import close_tree
from repskip.cli import main

STRATEGY_ARGS = {"block-influence": [], "angular-block": [], "paper": ["--threshold", "0"]}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def _analysis(folder: Path) -> dict:
    data = json.loads((folder / "analysis.json").read_text())
    return {"groups": data["groups"], "profile": data["token_distance_profile"]}


def _recipe(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((folder / "recipe.yaml").read_text())


@pytest.mark.parametrize("name", ["llama", "llada",
                                  *[pytest.param(n, marks=pytest.mark.slow) for n in ("qwen2", "qwen3", "mistral",
                                                                                      "dream")]])
def test_sequential_analysis_and_repair_equal_the_in_memory_ones(name, tiny, tmp_path):
    """The statistics, every similarity strategy's selection and the repair maps, for each
    family (the diffusion ones' masked sweep included)."""
    from helpers import dream_from_qwen2, llada_from_llama

    convert = {"llada": (llada_from_llama, "llama"), "dream": (dream_from_qwen2, "qwen2")}
    model = convert[name][0](tiny[convert[name][1]], tmp_path / name) if name in convert else tiny[name]
    outputs = {}
    for mode in ("none", "sequential"):
        result = run("analyze", model, "-o", tmp_path / mode, "-k", "2", "--num-samples", "12",
                     "--max-length", "48", "--batch-size", "5", "--offload", mode)
        assert result.exit_code == 0, result.output
        outputs[mode] = tmp_path / mode
    assert "one layer at a time" in run("analyze", model, "-o", tmp_path / "again", "-k", "2", "--num-samples", "4",
                                        "--max-length", "16", "--offload", "sequential", "--repair", "none").stderr
    close_tree(_analysis(outputs["none"]), _analysis(outputs["sequential"]))
    kept, streamed = _recipe(outputs["none"]), _recipe(outputs["sequential"])
    assert kept["resolved"]["remove"] == streamed["resolved"]["remove"]
    # auto (the default) weighed the same candidates with the same losses, streamed or not
    weighed = [json.loads((outputs[m] / "analysis.json").read_text())["auto"]["candidates"] for m in outputs]
    assert [c["remove"] for c in weighed[0]] == [c["remove"] for c in weighed[1]] and len(weighed[0]) > 1
    for one, two in zip(*weighed):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-4) and one["maps_kept"] == two["maps_kept"]
    maps = [load_file(str(outputs[m] / "repair.safetensors")) for m in ("none", "sequential")]
    assert maps[0].keys() == maps[1].keys() and maps[0]
    for key in maps[0]:
        assert abs(maps[0][key] - maps[1][key]).max() <= 1e-5
    for strategy, extra in STRATEGY_ARGS.items():
        chosen = []
        for mode in ("none", "sequential"):
            out = tmp_path / f"{mode}-{strategy}.yaml"
            result = run("select", outputs[mode] / "analysis.json", "--strategy", strategy, "-k", "2", *extra, "-o", out)
            assert result.exit_code == 0, result.output
            chosen.append(json.dumps(_recipe_file(out)["resolved"]["remove"]))
        assert chosen[0] == chosen[1], strategy


def _recipe_file(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_auto_streams_a_model_that_does_not_fit_the_budget(tiny, tmp_path):
    """The tiny Llama needs about 1.5 MB whole and 0.33 MB one layer at a time: a budget of
    600 kB takes the second."""
    result = run("analyze", tiny["llama"], "-o", tmp_path / "a", "-k", "1", "--num-samples", "2", "--max-length", "8",
                 "--max-memory", "600kB", "--repair", "none")
    assert result.exit_code == 0, result.output
    assert "one layer at a time" in result.stderr
    result = run("analyze", tiny["llama"], "-o", tmp_path / "b", "-k", "1", "--num-samples", "2", "--max-length", "8",
                 "--max-memory", "1GB", "--repair", "none")
    assert result.exit_code == 0 and "one layer at a time" not in result.stderr


def test_offload_none_refuses_a_model_that_does_not_fit_before_loading(tiny, tmp_path):
    result = run("analyze", tiny["llama"], "-o", tmp_path / "a", "--num-samples", "2", "--max-length", "8",
                 "--max-memory", "600kB", "--offload", "none")
    one_line_error(result, "--offload sequential")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())


def test_a_budget_below_one_layer_is_refused(tiny, tmp_path):
    result = run("analyze", tiny["llama"], "-o", tmp_path / "a", "--num-samples", "2", "--max-length", "8",
                 "--max-memory", "100kB", "--offload", "sequential")
    one_line_error(result, "raise --max-memory")
    assert not list(tmp_path.iterdir())


def test_the_loss_search_on_a_streamed_model_writes_the_in_memory_recipe(tiny, tmp_path):
    """greedy-loss with the repair in the loop, one layer at a time from disk: the same rounds,
    the same layers and the same maps as in memory."""
    outputs = {}
    for mode in ("none", "sequential"):
        outputs[mode] = tmp_path / mode
        result = run("analyze", tiny["llama"], "-o", outputs[mode], "-k", "2", "--strategy", "greedy-loss",
                     "--num-samples", "10", "--max-length", "32", "--search-samples", "4", "--offload", mode)
        assert result.exit_code == 0, result.output
    searches = [json.loads((outputs[m] / "analysis.json").read_text())["search"] for m in ("none", "sequential")]
    assert [r["chosen"] for r in searches[0]["rounds"]] == [r["chosen"] for r in searches[1]["rounds"]]
    close_tree([r["losses"] for r in searches[0]["rounds"]], [r["losses"] for r in searches[1]["rounds"]])
    assert _recipe(outputs["none"])["resolved"]["remove"] == _recipe(outputs["sequential"])["resolved"]["remove"]
    maps = [load_file(str(outputs[m] / "repair.safetensors")) for m in ("none", "sequential")]
    assert maps[0].keys() == maps[1].keys() and maps[0]
    for key in maps[0]:
        assert abs(maps[0][key] - maps[1][key]).max() <= 1e-5


def test_an_offload_folder_inside_the_checkpoint_missing_or_read_only_is_refused(tiny, tmp_path, monkeypatch):
    base = ["analyze", tiny["llama"], "-o", tmp_path / "a", "--offload", "sequential", "--offload-folder"]
    before = sorted(p.name for p in tiny["llama"].iterdir())
    one_line_error(run(*base, tiny["llama"] / "scratch"), "inside the checkpoint")
    one_line_error(run(*base, tiny["llama"]), "inside the checkpoint")
    one_line_error(run(*base, tmp_path / "missing"), "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: let the check see what another user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked and mode & os.W_OK else real(p, mode))
    one_line_error(run(*base, locked), "not writable")
    assert sorted(p.name for p in tiny["llama"].iterdir()) == before
    assert not (tmp_path / "a").exists()


def test_the_offload_folder_keeps_the_users_files_and_loses_a_killed_runs_debris(tiny, tmp_path):
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "repskip-offload-keep").mkdir()  # not a name a run gives: the user's
    dead = folder / "repskip-offload-999999999-abcd"  # a run with this pid cannot be alive
    dead.mkdir()
    (dead / "x.dat").write_bytes(b"0" * 16)
    result = run("analyze", tiny["llama"], "-o", tmp_path / "a", "-k", "1", "--num-samples", "2", "--max-length", "8",
                 "--offload", "sequential", "--offload-folder", folder, "--repair", "none")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "repskip-offload-keep"]
    assert (folder / "notes.txt").read_text() == "mine"


def test_compress_resolves_an_unresolved_recipe_one_layer_at_a_time_as_in_memory(tiny, tmp_path):
    """compress with a preset: the resolution (analysis and repair fit) streamed from disk
    writes the same checkpoint, byte for byte, as the one run in memory; its refusals come
    before anything is written."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("schema_version: 1\nselection: {strategy: block-influence, k: 2, repair: linear}\n"
                      "calibration: {num_samples: 12, max_length: 48, batch_size: 5}\n")
    shards = {}
    for mode in ("none", "sequential"):
        out = tmp_path / f"out-{mode}"
        result = run("compress", tiny["llama"], "--recipe", preset, "-o", out, "--offload", mode)
        assert result.exit_code == 0, result.output
        assert ("one layer at a time" in result.stderr) == (mode == "sequential")
        shards[mode] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert shards["none"] == shards["sequential"] and shards["none"]
    result = run("compress", tiny["llama"], "--recipe", preset, "-o", tmp_path / "refused", "--offload", "none",
                 "--max-memory", "1200kB")
    one_line_error(result, "--offload sequential")
    assert not (tmp_path / "refused").exists()


def test_states_beyond_what_the_layers_leave_wait_on_disk_with_the_same_result(tiny, tmp_path):
    """400 kB: one layer of the tiny Llama fits, the 12 x 48-token calibration states do not."""
    outputs = {}
    for name, extra in (("memory", ["--offload", "none"]), ("spilled", ["--max-memory", "400kB"])):
        outputs[name] = tmp_path / name
        result = run("analyze", tiny["llama"], "-o", outputs[name], "-k", "2", "--num-samples", "12",
                     "--max-length", "48", "--batch-size", "5", *extra)
        assert result.exit_code == 0, result.output
    assert "wait on disk" in result.stderr
    close_tree(_analysis(outputs["memory"]), _analysis(outputs["spilled"]))
    maps = [load_file(str(outputs[m] / "repair.safetensors")) for m in ("memory", "spilled")]
    assert maps[0].keys() == maps[1].keys() and maps[0]
    for key in maps[0]:
        assert abs(maps[0][key] - maps[1][key]).max() <= 1e-5
