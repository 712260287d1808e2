"""Plugins are found through entry points, from anywhere on the path, and a broken one is
skipped with one warning line. The out-of-tree plugin used here is the worked example of
docs/plugins.md (docs/examples/repskip-example), which lives outside the repskip source tree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from helpers import fake_install, make_tokenizer
from repskip import registry
from repskip.family import find_family
from repskip.flops import forward_flops
from repskip.pipeline import analyze, compress, open_model
from repskip.recipe import Recipe, Resolved
from repskip.sampler import get_sampler

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "repskip-example"


def example_entry_points() -> dict[str, dict[str, str]]:
    import tomllib

    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    return project["entry-points"]


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    site = fake_install(tmp_path / "site", "repskip-example", "0.1.0", example_entry_points())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.refresh()
    yield site
    registry.refresh()


@pytest.fixture
def tiny_gpt2(tmp_path):
    torch.manual_seed(3)
    tok = make_tokenizer()
    config = GPT2Config(vocab_size=320, n_embd=64, n_layer=6, n_head=4, n_positions=128,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path = tmp_path / "gpt2"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_builtin_plugins_register_through_entry_points():
    families = {p.name: p for p in registry.plugins("families", refresh=True)}
    assert families["hf-decoder"].distribution == "repskip-hf"
    assert families["hf-decoder"].ok
    assert "ar" in registry.loaded("samplers")


def test_out_of_tree_plugin_is_discovered_and_used(example_plugin, tiny_gpt2, tmp_path):
    info = {p.name: p for p in registry.plugins("families")}["gpt2"]
    assert (info.distribution, info.version) == ("repskip-example", "0.1.0")
    handle = open_model(tiny_gpt2)
    assert handle.family_name == "gpt2"
    assert not str(Path(sys.modules[type(handle.family).__module__].__file__)).startswith(str(REPO / "repskip"))

    result = analyze(handle, num_samples=4, max_length=24)
    assert result.num_layers == 6

    out = tmp_path / "out"
    compress(handle, Recipe(resolved=Resolved(remove=[2, 3])), out)
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    expected = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    handle.family.remove_layers(expected, [0, 1, 4, 5])
    ids = torch.tensor([[10, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)

    # the example's plain-loop sampler agrees with the built-in greedy sampler
    tok = handle.family.load_tokenizer(out)
    ours = get_sampler("greedy-loop").generate(reloaded, tok, ["hello there"], max_new_tokens=8)
    builtin = get_sampler("ar").generate(reloaded, tok, ["hello there"], max_new_tokens=8)
    assert ours.token_ids == builtin.token_ids
    assert ours.forward_passes == len(ours.token_ids[0]) + (len(ours.token_ids[0]) < 8)


def test_example_family_flops_agree_with_torch_flop_counter(example_plugin, tiny_gpt2):
    handle = open_model(tiny_gpt2)
    geo = handle.family.geometry(handle.ckpt.config)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2, attn_implementation="eager").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(0, 300, (1, 33)))
    measured = counter.get_total_flops()
    assert abs(forward_flops(geo, 33).total - measured) / measured < 0.02


def test_a_broken_plugin_is_named_in_one_warning_and_skipped(tmp_path, monkeypatch):
    site = fake_install(tmp_path, "repskip-broken", "9.9", {"repskip.families": {"broken": "no_such_module_xyz:Family"}})
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        with pytest.warns(registry.PluginWarning, match="plugin 'broken'.*repskip-broken.*skipped"):
            found = registry.plugins("families")
        broken = next(p for p in found if p.name == "broken")
        assert not broken.ok and "ModuleNotFoundError" in broken.error
        assert "broken" not in registry.loaded("families")
        assert find_family({"model_type": "llama"})[0] == "hf-decoder"
    finally:
        registry.refresh()


def test_cli_lists_third_party_and_survives_a_broken_plugin(tmp_path):
    site = fake_install(tmp_path / "a", "repskip-broken", "9.9", {"repskip.samplers": {"bad": "no_such_module_xyz:S"}})
    fake_install(site, "repskip-example", "0.1.0", example_entry_points())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE)])}
    cli = [sys.executable, "-m", "repskip", "plugins", "--json"]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = {(p["group"], p["name"]): p for p in json.loads(done.stdout)["plugins"]}
    assert listed[("families", "gpt2")]["version"] == "0.1.0"
    assert listed[("samplers", "greedy-loop")]["ok"]
    assert not listed[("samplers", "bad")]["ok"]
    warnings = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "warning:" in warnings[0] and "'bad'" in warnings[0]
    assert "Traceback" not in done.stderr


ARC_EASY = REPO.parent / "shared" / "data" / "arc" / "ARC-Easy-Test.jsonl"


@pytest.mark.skipif(not ARC_EASY.is_file(), reason="needs ../shared/data/arc")
def test_example_benchmark_loads_and_scores(example_plugin):
    from repskip.benchmark import get_benchmark
    from repskip.errors import RepskipError

    bench = get_benchmark("arc-easy")
    items = bench.load(ARC_EASY)
    assert len(items) == 2376 and len({i.id for i in items}) == 2376
    item = next(i for i in items if i.id == "Mercury_7081673")  # answer B: breathing mask
    assert "B. breathing mask" in item.prompt
    right = {"accuracy": 1.0}
    wrong = {"accuracy": 0.0}
    assert bench.score(item, "B") == right
    assert bench.score(item, "The answer is B.") == right
    assert bench.score(item, "A") == wrong
    assert bench.score(item, "a breathing mask") == wrong  # no label given
    assert bench.score(item, "") == wrong
    with pytest.raises(RepskipError, match="needs a data file"):
        bench.load(None)
    with pytest.raises(RepskipError, match="unknown benchmark 'nope'; installed benchmarks: arc-easy"):
        get_benchmark("nope")
