"""ONNX export and the ONNX Runtime runtime layer, on tiny checkpoints of every family."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error, dream_from_qwen2, llada_from_llama, make_checkpoint
from repskip import pipeline
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.formats import META_FILE, ONNX_FILE
from repskip.runtime import OrtCausalLM, OrtMaskedLM
from repskip.sampler import get_sampler

REMOVE = [2, 4]  # of 6 layers
PROMPTS = ["hello world", "a much longer prompt than the others, so rows pad", "x"]


def resolved_recipe(path: Path, remove=REMOVE) -> Path:
    path.write_text(f"schema_version: 1\nresolved:\n  remove: {list(remove)}\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> a tiny checkpoint in its exact layout (LLaDA from Llama, Dream from Qwen2)."""
    root = tmp_path_factory.mktemp("onnx-models")
    out = {fam: make_checkpoint(root / fam, fam, seed=i) for i, fam in enumerate(("qwen2", "llama", "qwen3", "mistral"))}
    out["llada"] = llada_from_llama(out["llama"], root / "llada")
    out["dream"] = dream_from_qwen2(out["qwen2"], root / "dream")
    return out


class _Exports(dict):
    """family -> (ONNX export, safetensors export, export result) of the same recipe, each
    exported the first time a test asks for it (a family whose tests are deselected costs nothing)."""

    def __init__(self, models: dict, root: Path):
        super().__init__()
        self.models, self.root = models, root
        self.recipe = resolved_recipe(root / "recipe.yaml")

    def __missing__(self, fam: str):
        result, _ = pipeline.compress(self.models[fam], self.recipe, self.root / f"{fam}-onnx", format="onnx")
        pipeline.compress(self.models[fam], self.recipe, self.root / f"{fam}-st")
        self[fam] = (self.root / f"{fam}-onnx", self.root / f"{fam}-st", result)
        return self[fam]


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    return _Exports(models, tmp_path_factory.mktemp("onnx-exports"))


# Mistral differs from Llama only by its sliding window, which the slow suite's export of every
# model type covers (tests/test_architectures.py)
FAMILIES = ["qwen2", "llama", "qwen3", pytest.param("mistral", marks=pytest.mark.slow), "llada", "dream"]


@pytest.mark.parametrize("fam", FAMILIES)
def test_export_parity_recorded(exports, fam):
    onnx_dir, _, result = exports[fam]
    files = {p.name for p in onnx_dir.iterdir()}
    assert {ONNX_FILE, "config.json", META_FILE, "repskip-recipe.yaml", "tokenizer.json"} <= files
    meta = json.loads((onnx_dir / META_FILE).read_text())
    assert meta["schema_version"] == 1 and meta["opset"] == 18 and meta["removed"] == REMOVE
    cases = meta["parity"]
    assert {c["batch"] for c in cases} == {1, 3}
    assert any(c["padded_rows"] > 0 for c in cases) and len({c["length"] for c in cases}) >= 3
    if meta["generative_kind"] == "autoregressive":
        assert meta["signature"] == "causal-lm-with-past"
        assert any(c["past"] > 0 and c["present_max_abs_diff"] is not None for c in cases)
    else:
        assert meta["signature"] == "masked-lm"
    assert 0 < meta["max_abs_diff"] <= meta["tolerance"] < 1e-2
    assert all(c["greedy_flips"] == 0 for c in cases)
    assert meta["max_abs_diff"] == result.max_abs_diff
    graph = onnx.load(str(onnx_dir / ONNX_FILE))
    assert graph.opset_import[0].version == 18
    assert json.loads((onnx_dir / "config.json").read_text()) == json.loads((exports[fam][1] / "config.json").read_text())
    # the model card, for ONNX: what runs it depends on the kind
    from huggingface_hub import ModelCard

    from repskip import card

    text = (onnx_dir / "README.md").read_text()
    data = ModelCard(text).data.to_dict()
    assert card.is_sealed(text) and data["library_name"] == "onnx" and "onnx" in data["tags"]
    assert data["base_model"] == fam and f"2 of {len(meta['kept']) + 2}" in text
    runs = "ORTModelForCausalLM" if meta["generative_kind"] == "autoregressive" else "repskip generate"
    assert runs in text


@pytest.mark.parametrize("fam", FAMILIES[:4])
def test_ar_graph_uses_optimum_names_with_dynamic_axes(exports, fam):
    graph = onnx.load(str(exports[fam][0] / ONNX_FILE), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    layers = 6 - len(REMOVE)
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    assert outputs == ["logits", *(f"present.{i}.{p}" for i in range(layers) for p in ("key", "value"))]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "sequence_length"]
    assert dims["past_key_values.0.key"][0] == "batch" and dims["past_key_values.0.key"][2] == "past_sequence_length"


@pytest.mark.parametrize("fam", FAMILIES)
def test_ort_greedy_equals_pytorch_greedy(exports, fam):
    onnx_dir, st_dir, _ = exports[fam]
    ort_handle, pt_handle = pipeline.open_model(onnx_dir, allow_onnx=True), pipeline.open_model(st_dir)
    assert ort_handle.onnx and not pt_handle.onnx
    ort_model, pt_model = ort_handle.load(provider="cpu"), pt_handle.load()
    assert isinstance(ort_model, OrtCausalLM if pt_handle.family.generative_kind == "autoregressive" else OrtMaskedLM)
    tok = pt_handle.family.load_tokenizer(st_dir)
    sampler = get_sampler(pt_handle.family.default_sampler, pt_handle.family)
    settings = {"ar": dict(max_new_tokens=16), "llada": dict(gen_length=16, block_length=8, steps=8),
                "dream": dict(max_new_tokens=16, steps=8)}[pt_handle.family.default_sampler]
    a = sampler.generate(pt_model, tok, PROMPTS, family=pt_handle.family, **settings)
    b = sampler.generate(ort_model, tok, PROMPTS, family=ort_handle.family, **settings)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.forward_passes == b.forward_passes  # incremental: one pass per token, not a re-run of the prefix
    assert any(len(ids) > 4 for ids in a.token_ids)


def test_ar_sampling_and_stop_strings_on_ort(exports):
    onnx_dir, st_dir, _ = exports["qwen2"]
    ort_model = pipeline.open_model(onnx_dir, allow_onnx=True).load(provider="cpu")
    pt_model = pipeline.open_model(st_dir).load()
    tok = pipeline.open_model(st_dir).family.load_tokenizer(st_dir)
    sampler = get_sampler("ar")
    greedy = sampler.generate(pt_model, tok, PROMPTS, max_new_tokens=16)
    # a token that decodes to a printable character, generated after some row's first token
    row, stop = next((r, tok.decode([t])) for r, ids in enumerate(greedy.token_ids) for t in ids[1:]
                     if tok.decode([t]).isascii() and tok.decode([t]).isprintable())
    a = sampler.generate(pt_model, tok, PROMPTS, max_new_tokens=16, stop=[stop])
    b = sampler.generate(ort_model, tok, PROMPTS, max_new_tokens=16, stop=[stop])
    assert a.token_ids == b.token_ids and len(a.token_ids[row]) < len(greedy.token_ids[row])
    s1 = sampler.generate(ort_model, tok, PROMPTS, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    s2 = sampler.generate(ort_model, tok, PROMPTS, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    s3 = sampler.generate(ort_model, tok, PROMPTS, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    assert s1.token_ids == s2.token_ids != s3.token_ids


def test_decode_step_on_ort_cache_matches_pytorch(exports):
    """The runtime layer's KV cache (IO-bound present -> past) against transformers' own cache."""
    onnx_dir, st_dir, _ = exports["qwen3"]
    ort_model = pipeline.open_model(onnx_dir, allow_onnx=True).load(provider="cpu")
    pt_model = pipeline.open_model(st_dir).load()
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = pt_model(input_ids=ids, use_cache=True)
        got = ort_model(ids)
        nxt = ids[:, :1]
        from repskip.runtime import cache_kwarg, output_cache

        ref2 = pt_model(input_ids=nxt, use_cache=True, **{cache_kwarg(pt_model): output_cache(ref)}).logits
        got2 = ort_model(nxt, past_key_values=got.past_key_values).logits
    assert torch.allclose(got.logits, ref.logits, atol=1e-4)
    assert got.past_key_values[0][0].shape[2] == 10 and torch.allclose(got2, ref2, atol=1e-4)


def initializer_elements(path: Path) -> int:
    graph = onnx.load(str(path / ONNX_FILE), load_external_data=False).graph
    return sum(int(torch.tensor(t.dims).prod()) for t in graph.initializer)


@pytest.mark.parametrize("fam", FAMILIES)
def test_graph_holds_the_kept_weights_once(exports, fam):
    """The graph's weights are the pruned checkpoint's: no removed layer, no duplicate (a tied
    embedding stored twice), only a few scalars of constants beyond them."""
    onnx_dir, st_dir, _ = exports[fam]
    kept = sum(int(torch.tensor(e.shape).prod()) for e in pipeline.open_model(st_dir).ckpt.tensors.values())
    assert kept <= initializer_elements(onnx_dir) <= kept * 1.001


def test_each_removed_layer_shrinks_the_file(models, exports, tmp_path):
    recipe = resolved_recipe(tmp_path / "one.yaml", remove=[5])
    pipeline.compress(models["qwen2"], recipe, tmp_path / "one-removed", format="onnx")
    one_layer = sum(int(torch.tensor(e.shape).prod()) for n, e in pipeline.open_model(models["qwen2"]).ckpt.tensors.items()
                    if n.startswith("model.layers.0."))
    grown = initializer_elements(tmp_path / "one-removed") - initializer_elements(exports["qwen2"][0])
    assert abs(grown - one_layer) <= 16  # one layer's weights, give or take a folded scalar
    saved = (tmp_path / "one-removed" / ONNX_FILE).stat().st_size - (exports["qwen2"][0] / ONNX_FILE).stat().st_size
    assert 0.9 <= saved / (4 * one_layer) <= 1.2  # fp32 bytes; the rest is the layer's graph nodes


def test_fp16_export(models, tmp_path):
    recipe = resolved_recipe(tmp_path / "r.yaml")
    result, _ = pipeline.compress(models["llada"], recipe, tmp_path / "fp16", format="onnx", export_dtype="fp16")
    assert result.dtype == "fp16" and 0 < result.max_abs_diff <= result.tolerance
    model = pipeline.open_model(tmp_path / "fp16", allow_onnx=True).load(provider="cpu")
    ids = torch.randint(0, 300, (2, 7))
    assert model(ids).dtype == torch.float16


def test_external_data(models, tmp_path):
    """Large models (over protobuf's 2 GB) keep weights beside the graph; forced here."""
    from repskip.compress.onnx_export import export_onnx

    handle = pipeline.open_model(models["mistral"])
    kept = [0, 1, 3, 5]
    config = handle.family.rewrite_config(handle.ckpt.config, kept)
    result = export_onnx(handle, kept, config, "schema_version: 1\n", tmp_path / "ext", external_data=True)
    assert result.external_data
    data_files = [p for p in (tmp_path / "ext").iterdir() if p.name.startswith(ONNX_FILE) and p.name != ONNX_FILE]
    assert data_files and data_files[0].stat().st_size > (tmp_path / "ext" / ONNX_FILE).stat().st_size
    model = pipeline.open_model(tmp_path / "ext", allow_onnx=True).load(provider="cpu")
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 320)


def test_parity_failure_writes_nothing(models, tmp_path, monkeypatch):
    """A graph that computes something else than the module fails the export loudly."""
    from repskip_hf.family import HFDecoderFamily
    from repskip_hf.onnx import CausalLMWithPast

    class Drifting(CausalLMWithPast):
        def forward(self, input_ids, attention_mask, position_ids, past):
            logits, *present = super().forward(input_ids, attention_mask, position_ids, past)
            if torch.compiler.is_exporting():  # only the traced graph drifts
                logits = logits + 0.01
            return (logits, *present)

    monkeypatch.setattr(HFDecoderFamily, "onnx_module", lambda self, model: Drifting(model))
    with pytest.raises(RepskipError, match="parity check failed.*nothing was written"):
        pipeline.compress(models["qwen2"], resolved_recipe(tmp_path / "r.yaml"), tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_loose_tolerance_does_not_let_other_greedy_tokens_through(models, tmp_path, monkeypatch):
    """--parity-tolerance bounds the size of a difference; a graph whose greedy tokens differ
    (here: the vocabulary shifted by one) still fails."""
    from repskip_hf.family import HFDecoderFamily
    from repskip_hf.onnx import CausalLMWithPast

    class Shifted(CausalLMWithPast):
        def forward(self, input_ids, attention_mask, position_ids, past):
            logits, *present = super().forward(input_ids, attention_mask, position_ids, past)
            if torch.compiler.is_exporting():
                logits = logits.roll(1, dims=-1)
            return (logits, *present)

    monkeypatch.setattr(HFDecoderFamily, "onnx_module", lambda self, model: Shifted(model))
    with pytest.raises(RepskipError, match="another greedy token than PyTorch at .* whatever the tolerance"):
        pipeline.compress(models["qwen2"], resolved_recipe(tmp_path / "r.yaml"), tmp_path / "out", format="onnx",
                          parity_tolerance=1e6)
    assert not (tmp_path / "out").exists()


def test_verify_runs_on_ort(models, exports, tmp_path):
    from repskip.verify.run import verify

    wiki = tmp_path / "wiki.txt"
    wiki.write_text("\n\n".join(f"Paragraph {i} says something about topic {i} and more words." for i in range(6)))
    onnx_dir, st_dir, _ = exports["llama"]
    common = dict(benches=["perplexity"], data={"perplexity": str(wiki)}, limit=3,
                  bench_options={"perplexity": {"chunk_chars": 40}})
    on_ort = verify(models["llama"], onnx_dir, output=tmp_path / "ort", provider="cpu", **common)
    on_pt = verify(models["llama"], st_dir, output=tmp_path / "pt", **common)
    assert on_ort["compressed"]["format"] == "onnx" and on_ort["compressed"]["provider"] == "cpu"
    a, b = on_ort["benchmarks"]["perplexity"], on_pt["benchmarks"]["perplexity"]
    assert a["base"] == b["base"] and a["compressed"] == pytest.approx(b["compressed"], rel=1e-4)
    assert a["compressed"] != a["base"]


def test_auto_provider_is_silent_without_a_gpu_and_says_why_with_one(exports, monkeypatch):
    import warnings

    import onnxruntime
    import torch

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: auto may pick CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU: CPU is what auto means, nothing to warn about
        model = pipeline.open_model(exports["qwen2"][0], allow_onnx=True).load()
    assert model.session.provider == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU torch can see, ORT cannot use
    with pytest.warns(UserWarning, match="qwen2-onnx on CPUExecutionProvider although a CUDA GPU is present: "
                                         "onnxruntime-gpu is not installed"):
        model = pipeline.open_model(exports["qwen2"][0], allow_onnx=True).load()
    assert model.session.provider == "cpu"


# --- the command line ----------------------------------------------------------------------------
def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_generate_and_flops(models, tmp_path):
    recipe = resolved_recipe(tmp_path / "r.yaml")
    out = tmp_path / "exported" / "dream-onnx"
    res = run(["compress", models["dream"], "--recipe", recipe, "--format", "onnx", "-o", out])
    assert res.exit_code == 0, res.output
    assert "parity: ONNX Runtime vs PyTorch" in res.stdout and "masked-lm, opset 18, fp32" in res.stdout
    res = run(["generate", out, "--prompt", "hi", "--max-new-tokens", "8", "--steps", "4", "--provider", "cpu"])
    assert res.exit_code == 0 and "ONNX Runtime CPU" in res.stdout and "4 layers" in res.stdout, res.output
    res = run(["flops", out, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["layers"] == 4
    again = run(["compress", models["dream"], "--recipe", recipe, "--format", "onnx", "-o", out])
    one_line_error(again, "already exists; pass --force")


@pytest.mark.parametrize("extra, message", [
    (["--opset", "17"], "opset 17 is not supported: repskip exports opset 18 to"),
    (["--opset", "99"], "opset 99 is not supported"),
    (["--export-dtype", "bf16"], "a bf16 graph runs on CUDAExecutionProvider only"),
])
def test_cli_bad_export_options(models, tmp_path, extra, message):
    res = run(["compress", models["qwen2"], "--recipe", resolved_recipe(tmp_path / "r.yaml"), "--format", "onnx",
               "-o", tmp_path / "out", *extra])
    one_line_error(res, message)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_unresolved_recipe_without_analysis_data(models, tmp_path):
    recipe = tmp_path / "unresolved.yaml"
    recipe.write_text("schema_version: 1\nselection:\n  strategy: paper\n  k: 2\n"
                      f"calibration:\n  source: {tmp_path / 'missing.jsonl'}\n")
    res = run(["compress", models["qwen2"], "--recipe", recipe, "--format", "onnx", "-o", tmp_path / "out"])
    one_line_error(res, "the recipe is unresolved and its analysis data cannot be read")
    assert "missing.jsonl" in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_provider_not_installed(models, exports, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    res = run(["generate", exports["qwen2"][0], "--prompt", "hi", "--provider", "cuda"])
    one_line_error(res, "CUDAExecutionProvider was asked for but this onnxruntime")
    res = run(["compress", models["qwen2"], "--recipe", resolved_recipe(tmp_path / "r.yaml"), "--format", "onnx",
               "--provider", "cuda", "-o", tmp_path / "out"])
    one_line_error(res, "install onnxruntime-gpu")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_corrupt_onnx(exports, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exports["qwen2"][0], bad)
    data = (bad / ONNX_FILE).read_bytes()
    (bad / ONNX_FILE).write_bytes(data[: len(data) // 3])  # a truncated download
    res = run(["generate", bad, "--prompt", "hi", "--provider", "cpu"])
    one_line_error(res, "is not a loadable ONNX model")


def test_cli_onnx_export_is_not_a_source(exports, tmp_path):
    res = run(["compress", exports["qwen2"][0], "--recipe", resolved_recipe(tmp_path / "r.yaml"), "-o", tmp_path / "o"])
    one_line_error(res, "is an ONNX export; this command needs the safetensors checkpoint")
