"""The CLI end to end, and every bad input answered by one line, a non-zero exit code, no
traceback and nothing left half-written."""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from helpers import load
from repskip.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_clean_error(result, message):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    text = result.stderr
    assert "Traceback" not in result.output
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], text  # stderr may also hold a progress bar
    assert message in errors[0], errors[0]


def test_analyze_compress_flops_end_to_end(tiny, tmp_path):
    runs = tmp_path / "runs"
    res = run("analyze", tiny["qwen2"], "-o", runs, "--strategy", "paper", "-k", "2", "--threshold", "-1",
              "--num-samples", "6", "--max-length", "32")
    assert res.exit_code == 0, res.output
    for name in ("analysis.json", "recipe.yaml", "similarity.png", "similarity_matrix.png", "token_distance.png"):
        assert (runs / name).stat().st_size > 0
    recipe = yaml.safe_load((runs / "recipe.yaml").read_text())
    removed = recipe["resolved"]["remove"]
    assert len(removed) == 2 and abs(removed[0] - removed[1]) > 1

    out = tmp_path / "exported" / "q-skip2"
    res = run("compress", tiny["qwen2"], "--recipe", runs / "recipe.yaml", "-o", out)
    assert res.exit_code == 0, res.output
    assert load(out).config.num_hidden_layers == 4

    res = run("flops", tiny["qwen2"], "--recipe", runs / "recipe.yaml", "--json", "--seq-len", "64")
    data = json.loads(res.stdout)
    assert data["schema_version"] == 1 and data["removed"] == removed
    assert data["layer_fraction"] == pytest.approx(2 / 6)
    assert 0 < data["forward"]["reduction"] < 2 / 6

    res = run("generate", out, "--prompt", "hello", "--max-new-tokens", "5")
    assert res.exit_code == 0 and "4 layers" in res.stdout

    res = run("select", runs / "analysis.json", "-o", tmp_path / "bi.yaml", "--strategy", "block-influence", "-k", "3")
    assert res.exit_code == 0, res.output
    assert len(yaml.safe_load((tmp_path / "bi.yaml").read_text())["resolved"]["remove"]) == 3


def test_analysis_is_kept_when_too_few_layers_qualify(tiny, tmp_path):
    runs = tmp_path / "runs"
    res = run("analyze", tiny["llama"], "-o", runs, "--strategy", "paper", "-k", "2", "--threshold", "0.99999",
              "--num-samples", "3", "--max-length", "16")
    assert_clean_error(res, "only 0 layer(s) qualify")
    assert "repskip select" in res.stderr
    assert (runs / "analysis.json").is_file() and not (runs / "recipe.yaml").exists()
    res = run("select", runs / "analysis.json", "-o", tmp_path / "r.yaml", "-k", "2", "--threshold", "-1")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--num-samples", "0"], ["-k", "0"], ["--max-length", "1"]])
def test_out_of_range_numbers_are_usage_errors(tiny, tmp_path, option):
    res = run("analyze", tiny["llama"], "-o", tmp_path / "o", *option)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value" in res.stderr
    assert not (tmp_path / "o").exists()


def test_unresolved_preset_through_cli(tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("schema_version: 1\nselection: {strategy: angular-block, k: 2}\ncalibration: {num_samples: 3, max_length: 16}\n")
    res = run("compress", tiny["llama"], "--recipe", preset, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "unresolved" in res.stdout
    assert load(tmp_path / "out").config.num_hidden_layers == 4


@pytest.fixture
def broken_checkpoints(tiny, tmp_path):
    made = {}
    made["no_config"] = tmp_path / "no_config"
    made["no_config"].mkdir()
    made["no_weights"] = tmp_path / "no_weights"
    made["no_weights"].mkdir()
    shutil.copy(tiny["llama"] / "config.json", made["no_weights"])
    made["pickle"] = tmp_path / "pickle"
    shutil.copytree(made["no_weights"], made["pickle"])
    (made["pickle"] / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    made["truncated"] = tmp_path / "truncated"
    shutil.copytree(tiny["llama"], made["truncated"])
    weights = made["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    made["corrupt"] = tmp_path / "corrupt"
    shutil.copytree(tiny["llama"], made["corrupt"])
    raw = bytearray((made["corrupt"] / "model.safetensors").read_bytes())
    raw[8:20] = b"\xff" * 12
    (made["corrupt"] / "model.safetensors").write_bytes(bytes(raw))
    made["unsupported"] = tmp_path / "unsupported"
    shutil.copytree(tiny["llama"], made["unsupported"])
    cfg = json.loads((made["unsupported"] / "config.json").read_text())
    cfg.update(model_type="my_own_model", architectures=["MyOwnModelForCausalLM"])
    (made["unsupported"] / "config.json").write_text(json.dumps(cfg))
    return made


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("no_config", "not a model checkpoint: it has no config.json"),
        ("no_weights", "no model.safetensors"),
        ("pickle", "only pickle weights"),
        ("truncated", "truncated or corrupt"),
        ("corrupt", "truncated or corrupt"),
        ("unsupported", "unsupported architecture (model_type 'my_own_model'"),
    ],
)
@pytest.mark.parametrize("command", ["analyze", "compress", "flops"])
def test_bad_checkpoints(broken_checkpoints, tmp_path, case, message, command):
    path = broken_checkpoints.get(case, tmp_path / "missing")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1]}\n")
    out = tmp_path / "out"
    args = {
        "analyze": ["analyze", path, "-o", out],
        "compress": ["compress", path, "--recipe", recipe, "-o", out],
        "flops": ["flops", path, "--remove", "1"],
    }[command]
    assert_clean_error(run(*args), message)
    assert not out.exists()


def test_unsupported_architecture_says_what_is_supported_and_how_to_add_one(broken_checkpoints, tmp_path):
    res = run("flops", broken_checkpoints["unsupported"])
    assert_clean_error(res, "Supported: ")
    assert "hf-decoder: every decoder-only causal LM of the installed transformers" in res.stderr
    assert "llada" in res.stderr and "docs/plugins.md" in res.stderr


@pytest.mark.parametrize(
    "remove, message",
    [("7", "out of range"), ("2,2", "more than once"), ("0,1,2,3,4,5", "removes all 6 layers"), ("x", "comma-separated")],
)
def test_bad_layer_lists(tiny, tmp_path, remove, message):
    assert_clean_error(run("flops", tiny["llama"], "--remove", remove), message)
    recipe = tmp_path / "r.yaml"
    if remove != "x":
        recipe.write_text(f"schema_version: 1\nresolved: {{remove: [{remove}]}}\n")
        out = tmp_path / "out"
        assert_clean_error(run("compress", tiny["llama"], "--recipe", recipe, "-o", out), message)
        assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_recipe_for_another_model(tiny, tmp_path):
    runs = tmp_path / "runs"
    assert run("analyze", tiny["qwen2"], "-o", runs, "-k", "1", "--threshold", "-1", "--num-samples", "3",
               "--max-length", "16").exit_code == 0
    out = tmp_path / "out"
    assert_clean_error(run("compress", tiny["qwen3"], "--recipe", runs / "recipe.yaml", "-o", out),
                       "made for a different model")
    assert not out.exists()


def test_output_exists_needs_force(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1]}\n")
    out = tmp_path / "out"
    out.mkdir()
    assert_clean_error(run("compress", tiny["llama"], "--recipe", recipe, "-o", out), "already exists; pass --force")
    assert_clean_error(run("analyze", tiny["llama"], "-o", out), "already exists; pass --force")
    assert list(out.iterdir()) == []
    assert run("compress", tiny["llama"], "--recipe", recipe, "-o", out, "--force").exit_code == 0


def test_bad_recipe_file(tiny, tmp_path):
    assert_clean_error(run("compress", tiny["llama"], "--recipe", tmp_path / "none.yaml", "-o", tmp_path / "o"),
                       "recipe file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nselection: {k: -3}\n")
    assert_clean_error(run("compress", tiny["llama"], "--recipe", bad, "-o", tmp_path / "o"), "selection.k")


def cli_subprocess(args, env=None, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "repskip", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, timeout=300)


def test_a_write_that_fails_midway_leaves_nothing(tiny_sharded, tmp_path):
    """A real failure: a file-size limit stops the shard write partway through the tensor copy."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1]}\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    limit = 200_000  # the output shard needs about twice that

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = cli_subprocess(["compress", tiny_sharded, "--recipe", recipe, "-o", dest / "out", "--max-shard-size",
                           "10MB"], preexec_fn=small_files)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "nothing was written" in done.stderr and "error:" in done.stderr
    assert list(dest.iterdir()) == []


def test_hub_id_offline_is_a_clear_error(tmp_path):
    done = cli_subprocess(["flops", "some-org/some-model"], env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not be fetched from the Hugging Face Hub" in lines[0]


def test_hub_id_is_served_from_the_cache_offline(tiny, tmp_path):
    """A Hub id already in the huggingface_hub cache resolves without the network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--some-org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny["llama"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    done = cli_subprocess(["flops", "some-org/tiny", "--json"], env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"] == 6
    assert constants is not None


def test_generate_with_a_model_spread_over_memory_and_disk_writes_the_in_memory_text(tiny, tmp_path):
    args = ["generate", tiny["llama"], "--prompt", "hello", "--prompt", "a longer prompt", "--max-new-tokens", "6"]
    whole = run(*args)
    spread = run(*args, "--device-map", "auto", "--max-memory", "600kB", "--offload-folder", tmp_path)
    assert whole.exit_code == 0 and spread.exit_code == 0, spread.output
    assert spread.stdout == whole.stdout
    assert not list(tmp_path.iterdir())  # the fresh folder the layers waited in is gone
    assert_clean_error(run(*args, "--max-memory", "600kB"), "--device-map auto")
