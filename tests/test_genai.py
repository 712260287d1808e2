"""genai_config.json: onnxruntime-genai runs an autoregressive export as repskip writes it, and
picks the same greedy tokens as `repskip generate` on the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import llada_from_llama, make_checkpoint
from repskip import pipeline
from repskip.compress.genai import GENAI_FILE, genai_config, write_genai_config
from repskip.family import find_family
from repskip.formats import META_FILE
from repskip.sampler import format_prompt, get_sampler

og = pytest.importorskip("onnxruntime_genai")
np = pytest.importorskip("numpy")

REMOVE = [1]  # of 3 layers: few layers keep the exports quick
PROMPTS = ["hello world", "a much longer prompt than the other one, so the batch pads"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> its ONNX export with one layer removed (Llama ties its embeddings, Qwen2 has
    grouped keys and values)."""
    root = tmp_path_factory.mktemp("genai")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"schema_version: 1\nresolved:\n  remove: {REMOVE}\n")
    out = {}
    for seed, fam in enumerate(("llama", "qwen2")):
        source = make_checkpoint(root / fam, fam, seed=seed, num_hidden_layers=3)
        pipeline.compress(source, recipe, root / f"{fam}-onnx", format="onnx")
        out[fam] = root / f"{fam}-onnx"
    return out


def repskip_greedy(folder: Path, prompts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts' token ids and the greedy continuations `repskip generate FOLDER --prompt ...
    --max-new-tokens N` makes (the same library calls, with the chat template as its default)."""
    handle = pipeline.open_model(folder, allow_onnx=True)
    model = handle.load(provider="cpu")
    tokenizer = handle.family.load_tokenizer(handle.path)
    texts = [format_prompt(tokenizer, p, chat=True) for p in prompts]
    out = get_sampler(handle.family.default_sampler, handle.family).generate(
        model, tokenizer, texts, family=handle.family, max_new_tokens=NEW_TOKENS)
    return [tokenizer(t)["input_ids"] for t in texts], out.token_ids


def genai_greedy(folder: Path, rows: list[list[int]]) -> list[list[int]]:
    """onnxruntime-genai's continuations of the token rows, with the search genai_config.json
    gives; cut at the first end or padding token, as repskip cuts its own."""
    config = json.loads((folder / GENAI_FILE).read_text())["model"]
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    stops = {*eos, config["pad_token_id"]}
    model = og.Model(str(folder))
    width = max(len(r) for r in rows)
    # genai pads a batch on the right with pad_token_id (as its own Tokenizer.encode_batch does)
    ids = np.array([r + [config["pad_token_id"]] * (width - len(r)) for r in rows], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + NEW_TOKENS, batch_size=len(rows))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    out = []
    for i in range(len(rows)):
        new = generator.get_sequence(i).tolist()[width:]
        out.append(new[: next((j for j, t in enumerate(new) if t in stops), len(new))])
    return out


def test_genai_config_describes_the_pruned_graph(exports):
    folder = exports["llama"]
    doc = json.loads((folder / GENAI_FILE).read_text())
    config = json.loads((folder / "config.json").read_text())
    model, decoder, search = doc["model"], doc["model"]["decoder"], doc["search"]
    assert model["type"] == "decoder" and model["context_length"] == 4096 and model["vocab_size"] == 320
    assert model["eos_token_id"] == 2 and model["pad_token_id"] == 0 and "bos_token_id" not in model
    assert decoder["filename"] == "model.onnx" and decoder["num_hidden_layers"] == config["num_hidden_layers"] == 2
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"]) == (16, 64, 4, 4)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert search["do_sample"] is False and search["max_length"] == 4096 and search["num_beams"] == 1
    assert search["past_present_share_buffer"] is False
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["genai_config"] == {"written": True, "reason": None}
    qwen2 = json.loads((exports["qwen2"] / GENAI_FILE).read_text())["model"]["decoder"]
    assert (qwen2["num_attention_heads"], qwen2["num_key_value_heads"], qwen2["head_size"]) == (4, 2, 16)


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_genai_greedy_equals_repskip_generate(exports, fam):
    folder = exports[fam]
    for prompt in PROMPTS:  # batch 1
        rows, expected = repskip_greedy(folder, [prompt])
        assert genai_greedy(folder, rows) == expected
    # batch 2, prompts of different lengths: repskip pads on the left, genai on the right
    rows, expected = repskip_greedy(folder, PROMPTS)
    assert len(rows[0]) != len(rows[1])
    assert genai_greedy(folder, rows) == expected
    assert all(len(ids) > 4 for ids in expected)  # a real continuation, not an early stop


def test_diffusion_export_has_no_genai_config(tmp_path):
    llama = make_checkpoint(tmp_path / "llama", "llama", seed=3, num_hidden_layers=2)
    llada = llada_from_llama(llama, tmp_path / "llada")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("schema_version: 1\nresolved:\n  remove: [1]\n")
    (llada / GENAI_FILE).write_text("{}")  # a stray file in the source is not copied along
    pipeline.compress(llada, recipe, tmp_path / "out", format="onnx")
    assert not (tmp_path / "out" / GENAI_FILE).exists()
    assert (llada / GENAI_FILE).read_text() == "{}"  # the source's own file is left as it was
    record = json.loads((tmp_path / "out" / META_FILE).read_text())["genai_config"]
    assert record["written"] is False and "no masked-diffusion loop" in record["reason"]


def test_layers_with_different_cache_shapes_get_no_genai_config(tmp_path):
    source = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    config = json.loads((source / "config.json").read_text())
    _, family = find_family(config)
    doc, reason = genai_config(config, family, source, [((4, 16), (4, 16)), ((2, 16), (2, 16))])
    assert doc is None and "heads x head size: 2x16, 4x16" in reason
    doc, reason = genai_config(config, family, source, [((4, 24), (4, 16))] * 2)  # keys wider than values
    assert doc is None and "one head size for every layer" in reason
    (tmp_path / GENAI_FILE).write_text("{}")
    record = write_genai_config(tmp_path, config, family, source, [((4, 16), (4, 16)), ((2, 16), (2, 16))])
    assert record["written"] is False and not (tmp_path / GENAI_FILE).exists()


def test_search_and_special_tokens_come_from_generation_config(tmp_path):
    source = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    config = json.loads((source / "config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.7, "top_p": 0.9,
         "max_length": 99999, "repetition_penalty": 1.1}))
    _, family = find_family(config)
    doc, reason = genai_config(config, family, source, [((4, 16), (4, 16))] * 2)
    assert reason is None
    assert doc["model"]["bos_token_id"] == 1 and doc["model"]["eos_token_id"] == [2, 0]
    assert doc["search"] == {"do_sample": True, "num_beams": 1, "max_length": 4096, "past_present_share_buffer": False,
                             "temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}
