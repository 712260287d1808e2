"""compress --format onnx --quantize int8: the int8 graph, its check against PyTorch, and
the refusals, on a tiny pruned Llama."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error, make_checkpoint, one_line
from onnx import numpy_helper
from repskip import pipeline
from repskip.cli import main
from repskip.compress import quantize as quantize_mod
from repskip.errors import RepskipError
from repskip.formats import META_FILE, ONNX_FILE

REMOVE = [2, 4]  # of 6 layers


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"schema_version: 1\nresolved:\n  remove: {REMOVE}\n")
    return make_checkpoint(root / "llama", "llama", seed=1), recipe


@pytest.fixture(scope="module")
def int8(llama, tmp_path_factory):
    """The CLI's int8 export of the pruned tiny Llama, and what it printed."""
    model, recipe = llama
    out = tmp_path_factory.mktemp("int8") / "llama-int8"
    res = run(["compress", model, "--recipe", recipe, "--format", "onnx", "--quantize", "int8", "-o", out])
    assert res.exit_code == 0, res.output
    return out, res.stdout


def test_int8_export_holds_only_the_int8_graph(int8):
    out, _ = int8
    files = {p.name for p in out.iterdir()}
    assert {ONNX_FILE, META_FILE, "config.json", "tokenizer.json"} <= files
    # no fp32 leftover: one graph, no external data, no intermediate file of the quantiser
    assert [name for name in files if ".onnx" in name or name.endswith(".data")] == [ONNX_FILE]
    meta = json.loads((out / META_FILE).read_text())
    q = meta["quantization"]
    assert meta["onnx_bytes"] == q["bytes_after"] == (out / ONNX_FILE).stat().st_size
    assert q["bytes_after"] < 0.5 * q["bytes_before"]


def test_int8_graph_multiplies_by_int8_weights(int8):
    out, _ = int8
    graph = onnx.load(str(out / ONNX_FILE)).graph
    inits = {t.name: t for t in graph.initializer}
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in quantized[0].attribute}
    assert attrs["bits"] == 8 and attrs["block_size"] == quantize_mod.BLOCK_SIZE and attrs["accuracy_level"] == 4
    for node in quantized:  # the weight is an 8-bit initializer beside its fp32 block scales
        assert inits[node.input[1]].data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
        assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT
    # every projection of the 4 kept layers is quantised; a MatMul left in float has no constant
    # weight (attention's two, and the tied LM head reading the embedding through a Transpose)
    assert len(quantized) == 4 * 7
    assert all(n.input[1] not in inits for n in graph.node if n.op_type == "MatMul")
    float_weights = sum(numpy_helper.to_array(t).size for t in graph.initializer
                        if t.data_type == onnx.TensorProto.FLOAT and not t.name.endswith("_scales"))
    assert float_weights < 320 * 64 * 1.1  # the embedding table, norms and a few constants


def test_metadata_records_the_quantisation_and_its_check(int8):
    out, stdout = int8
    meta = json.loads((out / META_FILE).read_text())
    q = meta["quantization"]
    assert q["weight_type"].startswith("int8") and q["op_types"] == ["MatMul"] and q["per_channel"] is False
    assert q["thresholds"] == {"min_agreement": quantize_mod.MIN_AGREEMENT,
                               "max_relative_diff": quantize_mod.MAX_RELATIVE_DIFF, "near_tie": quantize_mod.NEAR_TIE}
    cases = q["parity"]
    assert {c["batch"] for c in cases} == {1, 3} and any(c["past"] > 0 for c in cases)
    assert any(c["padded_rows"] > 0 for c in cases)
    decisive = sum(c["decisive"] for c in cases)
    assert decisive > 20 and q["agreement"] == sum(c["agreeing"] for c in cases) / decisive
    assert q["agreement"] >= quantize_mod.MIN_AGREEMENT
    assert 0 < q["max_relative_diff"] == max(c["relative_diff"] for c in cases) <= quantize_mod.MAX_RELATIVE_DIFF
    assert meta["dtype"] == "fp32" and 0 < meta["max_abs_diff"] <= meta["tolerance"]  # the fp32 check ran first
    assert "int8 check" in stdout and "greedy agreement" in stdout
    # the model card says so
    from huggingface_hub import ModelCard

    from repskip import card

    text = (out / "README.md").read_text()
    assert card.is_sealed(text) and "int8" in ModelCard(text).data.tags
    assert f"greedy tokens agree at {q['agreement']:.1%}" in text and "<!-- repskip:quantization -->" in text


def test_generate_runs_on_the_int8_graph(int8):
    out, _ = int8
    model = pipeline.open_model(out, allow_onnx=True).load(provider="cpu")
    assert model.kv_dtype == torch.float32 and model.dtype == torch.float32  # the cache stays fp32
    step = model(torch.tensor([[5, 6, 7]]))
    assert step.logits.shape == (1, 3, 320) and step.past_key_values[0][0].dtype == torch.float32
    res = run(["generate", out, "--prompt", "hello", "--max-new-tokens", "8", "--provider", "cpu"])
    assert res.exit_code == 0 and "ONNX Runtime CPU" in res.stdout and "4 layers" in res.stdout, res.output


def test_int8_with_external_data(llama, tmp_path):
    """A graph over 2 GB keeps its weights beside it (forced here): the int8 weights replace
    the fp32 ones in the one data file, nothing of the fp32 graph stays."""
    from repskip.compress.onnx_export import export_onnx

    model, _ = llama
    handle = pipeline.open_model(model)
    kept = [0, 1, 3, 5]
    config = handle.family.rewrite_config(handle.ckpt.config, kept)
    result = export_onnx(handle, kept, config, None, tmp_path / "ext", external_data=True, quantize="int8")
    assert result.external_data and result.quantization.quantized_nodes == 28
    names = sorted(p.name for p in (tmp_path / "ext").iterdir() if p.name.startswith(ONNX_FILE))
    assert names == [ONNX_FILE, f"{ONNX_FILE}.data"]
    header = onnx.load(str(tmp_path / "ext" / ONNX_FILE), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    data = (tmp_path / "ext" / f"{ONNX_FILE}.data").stat().st_size
    assert data < 0.5 * result.quantization.bytes_before
    loaded = pipeline.open_model(tmp_path / "ext", allow_onnx=True).load(provider="cpu")
    assert loaded(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 320)


def test_a_damaged_quantisation_is_refused_and_writes_nothing(llama, tmp_path, monkeypatch):
    """One projection's block scales doubled (a packing or scale bug): the check catches it."""
    model, recipe = llama
    real = quantize_mod._quantize_model

    def damaged(proto):
        proto = real(proto)
        scales = next(t for t in proto.graph.initializer if t.name.endswith("_scales"))
        scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * 2, scales.name))
        return proto

    monkeypatch.setattr(quantize_mod, "_quantize_model", damaged)
    failed = r"int8 check failed: .* required.* of the logit scale .*nothing was written"
    with pytest.raises(RepskipError, match=failed) as excinfo:
        pipeline.compress(model, recipe, tmp_path / "out", format="onnx", quantize="int8")
    one_line(excinfo)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("extra, message", [
    (["--format", "safetensors"], "--quantize int8 quantises an ONNX graph: pass --format onnx"),
    (["--format", "onnx", "--export-dtype", "fp16"], "--quantize int8 quantises the weights of an fp32 graph"),
])
def test_cli_refuses_int8_without_an_fp32_onnx_graph(llama, tmp_path, extra, message):
    model, recipe = llama
    res = run(["compress", model, "--recipe", recipe, "-o", tmp_path / "out", "--quantize", "int8", *extra])
    one_line_error(res, message)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # before any work: the model is not even opened
    res = run(["compress", tmp_path / "no-such-model", "--recipe", recipe, "-o", tmp_path / "out", "--quantize",
               "int8", *extra])
    one_line_error(res, message)


def test_library_refuses_int8_before_writing(llama, tmp_path):
    model, recipe = llama
    with pytest.raises(RepskipError, match="pass --format onnx") as excinfo:
        pipeline.compress(model, recipe, tmp_path / "out", quantize="int8")
    one_line(excinfo)
    with pytest.raises(RepskipError, match="unknown quantisation 'int4'; choose none or int8"):
        pipeline.compress(model, recipe, tmp_path / "out", format="onnx", quantize="int4")
    assert not (tmp_path / "out").exists()
