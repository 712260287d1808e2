"""Every decoder-only causal LM of the installed transformers that repskip claims to handle,
held to the claim: plugins/hf/repskip_hf/tested.json, made by ``python tests/architectures.py``
with the same checks, says per model type what works (analyze, compress, repair, ONNX, heal);
docs/architectures.md shows it. Each model type is built tiny and random from its own config
class, saved as transformers saves it, then run through the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import architectures as A
from helpers import one_line
from repskip.errors import RepskipError

SUPPORT = json.loads(A.SUPPORT.read_text())
TYPES = SUPPORT["types"]
COMPRESSED = sorted(t for t, r in TYPES.items() if r.get("compress") == "ok")
EXPORTED = sorted(t for t in COMPRESSED if TYPES[t].get("onnx") == "ok")
HEALED = sorted(t for t in COMPRESSED if TYPES[t].get("heal") == "ok")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The analysis's figures are tested elsewhere; here they would only cost time."""
    from repskip.analyze import plots

    for name in ("consecutive_similarity", "similarity_heatmap", "token_distance_profile"):
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: None)


# the default suite runs one model type of each kind the issue names (a dense decoder, MoE,
# multi-head latent attention, sliding/global attention, a hybrid with state-space layers, and
# layers outside model.layers: transformer.h with Conv1D, gpt_neox.layers, model.decoder.layers);
# every other type runs with the slow tests (make test-all), all of them before a release
DEFAULT_SUITE = {"llama", "gemma3_text", "mixtral", "deepseek_v3", "bamba", "gpt2", "gpt_neox", "opt"}


def _in_default_suite(model_types: list[str]) -> list:
    return [t if t in DEFAULT_SUITE else pytest.param(t, marks=pytest.mark.slow) for t in model_types]


@pytest.mark.parametrize("model_type", _in_default_suite(COMPRESSED))
def test_analyze_compress_reload_and_repair(model_type, tmp_path):
    """analyze (with the repair where one folds); compress a removal by hand (reloads without
    a missing or unexpected key, gives the original model's logits with the layers bypassed
    within 1e-5, the same tokens with and without the KV cache, every kept layer's attention
    kind, and the same logits as the layers removed from a loaded model); compress the repaired
    recipe (the in-memory repaired model's logits), or the one-line refusal on record. Where
    the record says analyze fails for the type, only the hand removal is held to."""
    claim = TYPES[model_type]
    base = A.make(model_type, tmp_path)
    original = A.load_clean(base)
    if claim["analyze"] == "ok":
        if claim["repair"] == "ok" or claim["repair"].startswith("refused: "):
            repair = A.check_repair(model_type, base, tmp_path, original)
            assert repair == "ok" if claim["repair"] == "ok" else repair.startswith("refused: "), repair
        if claim["repair"] != "ok":
            A.ok(A.cli("analyze", base, "-o", tmp_path / "plain", "-k", "2", "--repair", "none", "--num-samples", "8",
                       "--max-length", "32", *A.ANALYZE_ARGS.get(model_type, [])))
    A.check_compress(model_type, base, tmp_path, original)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", EXPORTED)
def test_onnx_export_passes_its_parity_check(model_type, tmp_path):
    base = A.make(model_type, tmp_path)
    A.check_compress(model_type, base, tmp_path)
    out = A.check_onnx(model_type, base, tmp_path)
    record = json.loads((out / "repskip-onnx.json").read_text())
    assert record["max_abs_diff"] <= record["tolerance"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", HEALED)
def test_heal_trains_and_writes_a_checkpoint_that_reloads(model_type, tmp_path):
    base = A.make(model_type, tmp_path)
    compressed = A.check_compress(model_type, base, tmp_path)
    A.check_heal(model_type, compressed, base, tmp_path)


# --- what the table must cover -----------------------------------------------------------------
def _kinds(model_type: str) -> dict[str, bool]:
    from repskip_hf.cost import LINEAR_ATTENTION
    from repskip_hf.layout import layout

    lo = layout(A.tiny_config(model_type))
    classes = [{e["class"] for e in lo.signature(i).values()} for i in range(lo.num_layers)]
    settings = [json.dumps([e["settings"] for e in lo.signature(i).values()], sort_keys=True) for i in range(lo.num_layers)]
    attention = [any(c.endswith("Attention") and not LINEAR_ATTENTION.search(c) for c in cs) for cs in classes]
    windows = {json.dumps([e["settings"].get("sliding_window") for e in lo.signature(i).values()])
               for i in range(lo.num_layers) if attention[i]}
    return {
        "moe": any(".experts." in n for n in lo.native),
        "sliding_and_global": len(windows) > 1 and len(set(settings)) > 1,
        # a state-space mixer: Mamba's (Jamba, Granite hybrid) or its like (Bamba's, Falcon-H1's
        # Mixer), each with its depthwise Conv1d
        "hybrid_ssm": any(attention) and any("Conv1d" in cs and any("Mamba" in c or c.endswith("Mixer") for c in cs)
                                             for cs in classes),
        "not_model_layers": lo.layers_path != "model.layers",
    }


def test_the_tested_types_cover_what_users_bring():
    """At least 60 types that analyze and compress, among them 5 mixtures of experts, 3 with
    sliding and global attention in alternation, 2 attention / state-space hybrids, DeepSeek-V3's
    latent attention and 4 whose layers are not at model.layers; 15 that export to ONNX."""
    whole = [t for t in COMPRESSED if TYPES[t]["analyze"] == "ok"]
    assert len(whole) >= 60, len(whole)
    kinds = {t: _kinds(t) for t in COMPRESSED}
    count = {k: sorted(t for t in whole if kinds[t][k]) for k in next(iter(kinds.values()))}
    assert len(count["moe"]) >= 5, count["moe"]
    assert len(count["sliding_and_global"]) >= 3, count["sliding_and_global"]
    assert len(count["hybrid_ssm"]) >= 2, count["hybrid_ssm"]
    assert len(count["not_model_layers"]) >= 4, count["not_model_layers"]
    assert "deepseek_v3" in whole
    assert len(EXPORTED) >= 15, EXPORTED
    # the default suite's kinds are each on record (one not compressing would drop out of it)
    assert DEFAULT_SUITE <= set(COMPRESSED), DEFAULT_SUITE - set(COMPRESSED)
    default = {k: [t for t in DEFAULT_SUITE if kinds[t][k]] for k in count}
    assert all(default.values()), default


def test_the_docs_table_is_the_record():
    """docs/architectures.md shows tested.json as it is (regenerate both with tests/architectures.py)."""
    text = A.DOC.read_text()
    assert A.doc_table(SUPPORT) in text
    assert SUPPORT["transformers"] in text


def test_plugins_lists_what_works_per_model_type():
    out = A.cli("plugins", "--models", "--json")
    data = json.loads(A.ok(out))
    rows = {(r["family"], r["model_type"]): r for r in data["models"]}
    assert rows[("hf-decoder", "gpt2")]["compress"] == TYPES["gpt2"]["compress"]
    assert {t for (fam, t) in rows if fam == "hf-decoder"} == set(TYPES)


# --- layers whose kind repeats with a period ------------------------------------------------------
@pytest.mark.parametrize("model_type,layers,remove", [
    ("gemma3_text", 8, [2]),  # one global layer in six: layer 5 stays global as layer 4
    ("gpt_oss", 6, [1]),  # sliding and full attention in turn: two sliding layers meet
    ("cohere2", 8, [0, 4]),
])
def test_a_removal_that_breaks_the_period_keeps_every_layers_attention_kind(model_type, layers, remove, tmp_path,
                                                                             monkeypatch):
    config = A.tiny_config(model_type)
    config.update(num_hidden_layers=layers)
    for key in ("layer_types", "sliding_window_pattern", "_sliding_window_pattern"):
        config.pop(key, None)  # the model type's own default pattern, for this many layers
    from repskip_hf.layout import build_config

    config = json.loads(build_config(config).to_json_string(use_diff=False))
    kinds = config["layer_types"]
    kept = [i for i in range(layers) if i not in remove]
    assert [kinds[i] for i in kept] != kinds[: len(kept)], "the removal must break the period"
    monkeypatch.setitem(A.REMOVE_FOR, model_type, remove)
    base = A.save(A.build(model_type, config=config), tmp_path / model_type)
    out = A.check_compress(model_type, base, tmp_path)  # logits, cache and each layer's kind, as above
    assert json.loads((out / "config.json").read_text())["layer_types"] == [kinds[i] for i in kept]


# --- refusals, in one line, before anything is written ------------------------------------------------
def _refused(tmp_path, base, remove, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"schema_version": 1, "resolved": {"remove": remove}}))
    result = A.cli("compress", base, "--recipe", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_a_removal_no_period_and_offset_can_describe_is_refused_naming_the_fields(tmp_path):
    base = A.make("jamba", tmp_path)  # experts on every second layer, attention on layer 4
    _refused(tmp_path, base, [0, 2], "expert_layer_period/expert_layer_offset cannot describe the kept layers")


def test_removing_every_attention_layer_of_a_hybrid_is_refused(tmp_path):
    base = A.make("bamba", tmp_path)
    _refused(tmp_path, base, [1, 4], "removes every attention layer (1, 4)")


def test_a_layer_that_derives_a_setting_from_its_index_cannot_move(tmp_path):
    base = A.make("diffllama", tmp_path)  # lambda_init = 0.8 - 0.6 exp(-0.3 index)
    _refused(tmp_path, base, [0], "self_attn.lambda_init")


@pytest.mark.parametrize("model_type", ["cpmant", "deepseek_v4"])
def test_analyze_refuses_layers_that_carry_more_than_one_vector_per_token(model_type, tmp_path):
    """CPM-Ant prepends prompt tokens, DeepSeek-V4 carries hyper-connection streams: the
    per-token similarity is undefined, so analyze says so in one line and writes nothing."""
    base = A.make(model_type, tmp_path)
    out = tmp_path / "runs"
    result = A.cli("analyze", base, "-o", out, "-k", "2", "--repair", "none", "--num-samples", "8", "--max-length", "32")
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and len(errors) == 1, result.output
    assert "cannot measure this model" in errors[0] and "not one vector per token" in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_attention_scaled_by_the_layer_index_is_refused(tmp_path):
    config = A.tiny_config("gpt2")
    config["scale_attn_by_inverse_layer_idx"] = True
    base = A.save(A.build("gpt2", config=config), tmp_path / "gpt2")
    _refused(tmp_path, base, [1], "scale_attn_by_inverse_layer_idx is set")


@pytest.mark.parametrize("config,message", [
    ({"model_type": "not-a-model", "num_hidden_layers": 2}, "unsupported architecture (model_type 'not-a-model'"),
    ({"model_type": "bert", "num_hidden_layers": 2}, "is an encoder (bidirectional, masked LM)"),
    ({"model_type": "bart", "num_hidden_layers": 2}, "is an encoder-decoder model"),
    ({"model_type": "gemma3", "text_config": {}, "vision_config": {}}, "wraps other models (text_config, vision_config)"),
])
def test_what_is_not_a_decoder_only_causal_lm_is_refused_in_one_line(config, message, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for args in (["analyze", folder, "-o", tmp_path / "runs"], ["flops", folder, "--remove", "0"]):
        result = A.cli(*args)
        assert result.exit_code == 1, result.output
        lines = [x for x in result.output.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_whose_tensors_disagree_with_what_transformers_builds_is_refused(tmp_path):
    from helpers import edit_safetensors
    from repskip.pipeline import open_model

    base = A.make("gpt_neox", tmp_path)  # layers at gpt_neox.layers
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    edit_safetensors(bad / "model.safetensors", lambda t: t.__setitem__(
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight", torch.zeros(64, 80)))
    with pytest.raises(RepskipError) as err:
        open_model(bad)
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h.weight has shape [64, 80]; config.json implies [64, 96] " \
           "(hidden_size x intermediate_size)" in one_line(err)
    result = A.cli("compress", bad, "--recipe", tmp_path / "none.yaml", "-o", tmp_path / "out")
    assert result.exit_code != 0 and not (tmp_path / "out").exists()


# --- FLOPs, counted against what torch counts ---------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "opt", "phi", "gemma2", "cohere2", "starcoder2",
                                        "qwen2_moe", "mixtral", "olmoe", "granitemoe", "deepseek_v3"])
def test_analytic_flops_match_torchs_flop_counter(model_type):
    """Per-layer costs read off the meta model (experts by their routed share, latent
    attention's widths) against torch's FLOP counter on a real forward, attention and experts
    run as plain matrix products. (The counter cannot follow a state-space mixer's forward.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from repskip.flops import forward_flops

    config = A.tiny_config(model_type)
    if model_type == "deepseek_v3":  # its eager experts fail on this transformers: its latent attention alone
        config["first_k_dense_replace"] = A.LAYERS
    model = A.build(model_type, config=config)
    model.set_attn_implementation("eager")
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")  # only the experts a token is routed to, as plain products
    family = A.family_of_config(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=A.ids(2, 24))
    analytic = 2 * forward_flops(family.cost(config), 24).total
    measured = counter.get_total_flops()
    assert abs(analytic - measured) / measured < 0.03, (analytic, measured)


# --- a checkpoint that ships its own modeling code ----------------------------------------------------
REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
REMOTE_MODEL = '''import os
from pathlib import Path

from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig

Path(os.environ["REPSKIP_TEST_REMOTE_MARK"]).write_text("the checkpoint's code ran")


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def test_a_checkpoints_own_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("REPSKIP_TEST_REMOTE_MARK", str(mark))
    base = A.make("llama", tmp_path)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    (base / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (base / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"schema_version": 1, "resolved": {"remove": [1, 3]}}))

    for args in (["analyze", base, "-o", tmp_path / "runs"], ["compress", base, "--recipe", recipe, "-o", tmp_path / "out"],
                 ["flops", base, "--remove", "1"]):
        result = A.cli(*args)
        assert result.exit_code == 1
        lines = [x for x in result.output.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and "pass --trust-remote-code if you trust that code" in lines[0], result.output
    assert not mark.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()

    A.ok(A.cli("compress", base, "--recipe", recipe, "-o", tmp_path / "out", "--trust-remote-code"))
    assert mark.exists()
    assert (tmp_path / "out" / "modeling_tiny_remote.py").is_file()  # the output carries the code it needs
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(pruned).__name__ == "TinyRemoteForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True).eval()
    family = A.family_of(base)
    diff = A.max_diff(A.bypassed_logits(original, family, [1, 3]), A.logits(pruned))
    assert diff <= A.TOLERANCE


# --- verify and generate, on model types unlike Llama ----------------------------------------------
@pytest.mark.parametrize("model_type", ["mixtral", "jamba", "gpt_neox", "gemma3_text"])
def test_verify_scores_a_recipe_in_memory_as_the_compressed_checkpoint(model_type, tmp_path):
    """Perplexity of the model with the recipe's layers removed in memory equals that of the
    written checkpoint, and the FLOPs cut comes from the removed layers' own cost."""
    from repskip.verify.run import verify

    base = A.make(model_type, tmp_path)
    compressed = A.check_compress(model_type, base, tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(A.TEXT[i:i + 600] for i in range(0, len(A.TEXT), 600)))
    runs = {}
    for label, kwargs in (("recipe", dict(recipe=tmp_path / "remove.yaml")), ("checkpoint", dict(compressed=compressed))):
        report = verify(base, benches=["perplexity"], data={"perplexity": str(text)}, limit=4, max_length=64,
                        bench_options={"perplexity": {"chunk_chars": 500}},
                        output=tmp_path / f"v-{label}", speed_repeats=0, **kwargs)
        runs[label] = report["benchmarks"]["perplexity"]
    assert runs["recipe"]["compressed"] == pytest.approx(runs["checkpoint"]["compressed"], rel=1e-5)
    assert runs["recipe"]["base"] == runs["checkpoint"]["base"]
    flops = json.loads(A.ok(A.cli("flops", base, "--recipe", tmp_path / "remove.yaml", "--json")))
    assert flops["layer_fraction"] == pytest.approx(2 / A.LAYERS)
    assert 0 < flops["forward"]["reduction"] < 1 and 0 < flops["generation"]["reduction"] < 1
    out = A.ok(A.cli("generate", compressed, "--prompt", "hello", "--max-new-tokens", "4"))
    assert "4 layers" in out


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_neox"])
def test_the_loss_search_with_the_repair_in_the_loop_runs_on_any_layout(model_type, tmp_path):
    """greedy-loss scores each candidate with its repair fitted (the MLP writers found per
    layout); its recipe compresses to the model the search measured."""
    from repskip.recipe import load as load_recipe

    base = A.make(model_type, tmp_path)
    runs = tmp_path / "runs"
    A.ok(A.cli("analyze", base, "-o", runs, "--strategy", "greedy-loss", "-k", "2", "--repair", "linear",
               "--num-samples", "16", "--max-length", "32", "--search-samples", "8"))
    recipe = load_recipe(runs / "recipe.yaml")
    A.ok(A.cli("compress", base, "--recipe", runs / "recipe.yaml", "-o", tmp_path / "out"))
    family = A.family_of(base)
    maps = recipe.repair_maps(family.hidden_size(json.loads((base / "config.json").read_text())))
    want = A.bypassed_logits(A.load_clean(base), family, recipe.resolved.remove, maps)
    assert A.max_diff(want, A.logits(A.load_clean(tmp_path / "out"))) <= A.TOLERANCE
