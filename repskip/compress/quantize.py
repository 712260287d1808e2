"""int8 weights for an exported ONNX graph, kept only if it still gives PyTorch's tokens.

``repskip compress --format onnx --quantize int8`` rewrites the checked fp32 graph: every
MatMul whose weight is a constant becomes ONNX Runtime's ``MatMulNBits`` with 8-bit weights
(symmetric, one scale per block of ``BLOCK_SIZE`` input rows of each output column); at
accuracy level 4 ONNX Runtime quantises the activations to int8 per block at run time and
multiplies in int8. Inputs, outputs and the KV cache stay fp32. MatMuls whose weight is
computed (attention's, and a tied LM head, which reads the embedding table through a
Transpose) stay in float.

``quantize_dynamic`` (per-tensor uint8 activations, MatMulInteger) was measured first and is
not used: on SmolLM2-135M it changed the greedy token at most positions (docs/onnx.md).

The quantised graph is checked against the same PyTorch module on the fp32 check's cases,
with measures suited to int8: greedy-token agreement and the largest logit difference
relative to the logit scale (see the thresholds below).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RepskipError
from ..formats import ONNX_FILE

QUANTIZE = ("none", "int8")
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
# Thresholds of the int8 check. A position counts for agreement when PyTorch's greedy token
# leads its runner-up by more than NEAR_TIE of the logit scale (the largest |logit| of the
# case); closer calls are near ties that rounding may flip either way (random tiny models
# have many). Measured (docs/onnx.md): agreement 1.0 on every tiny family and on
# SmolLM2-135M-Instruct without layers 20-23 (repskip's cached copy, dequantised from a Q4_1
# GGUF); the largest difference 4.2e-2 of the logit scale on the tiny models, 6.8e-2 on
# SmolLM2. The thresholds leave a 10% share of flips and 3x that difference: one projection's
# scales doubled (the tests' damaged quantisation) exceeds both.
NEAR_TIE = 0.02
MIN_AGREEMENT = 0.9
MAX_RELATIVE_DIFF = 0.2


def check_quantize(quantize: str, format: str, export_dtype: str) -> None:
    """Refuse a quantisation the export cannot honour, before any work is done."""
    if quantize not in QUANTIZE:
        raise RepskipError(f"unknown quantisation {quantize!r}; choose {' or '.join(QUANTIZE)}")
    if quantize == "none":
        return
    if format != "onnx":
        raise RepskipError(f"--quantize {quantize} quantises an ONNX graph: pass --format onnx "
                           f"(a {format} checkpoint is written unquantised)")
    if export_dtype not in ("fp32", "float32"):
        raise RepskipError(f"--quantize {quantize} quantises the weights of an fp32 graph; "
                           f"pass --export-dtype fp32 (the default), not {export_dtype}")


@dataclass
class Int8Case:
    batch: int
    length: int
    past: int
    padded_rows: int
    positions: int  # real (unpadded) positions compared
    decisive: int  # of those, where PyTorch's token leads its runner-up by more than NEAR_TIE
    agreeing: int  # decisive positions where ONNX Runtime's greedy token is PyTorch's
    agreeing_all: int  # all real positions where it is
    logit_scale: float
    relative_diff: float  # largest |ORT - PyTorch| logit over the real positions / logit_scale


@dataclass
class Quantization:
    method: str
    weight_type: str
    op_types: list[str]
    per_channel: bool
    block_size: int
    accuracy_level: int
    activations: str
    quantized_nodes: int
    float_nodes: int  # MatMuls left in float: their weight is not a constant
    bytes_before: int
    bytes_after: int
    agreement: float  # over the decisive positions of every case
    agreement_all: float  # over every real position, near ties included (not checked)
    max_relative_diff: float
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "min_agreement": MIN_AGREEMENT, "max_relative_diff": MAX_RELATIVE_DIFF, "near_tie": NEAR_TIE})
    parity: list[Int8Case] = field(default_factory=list)


def _quantizer() -> Any:
    """ONNX Runtime's MatMulNBits quantiser class. Importing its module calls
    ``logging.basicConfig(level=INFO)``, which would make every library's INFO records print;
    the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    return MatMulNBitsQuantizer


def _quantize_model(model: Any) -> Any:
    """``model`` (an onnx ModelProto) with its constant-weight MatMuls as 8-bit MatMulNBits."""
    quantizer = _quantizer()(model, bits=8, block_size=BLOCK_SIZE, is_symmetric=True,
                             accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    previous = log.level
    log.setLevel(logging.ERROR)  # it logs every node it skips
    try:
        quantizer.process()
    finally:
        log.setLevel(previous)
    return quantizer.model.model


def quantize_graph(folder: Path, external: bool) -> tuple[int, int, int, int]:
    """Replace ``folder``'s fp32 model.onnx (and its external data, if any) by the int8 graph,
    its weights in ``model.onnx.data`` when ``external``. Returns the graph's bytes before and
    after, and the MatMuls quantised and left in float."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    file = Path(folder) / ONNX_FILE
    header = onnx.load(str(file), load_external_data=False)
    old = {file} | {file.parent / ExternalDataInfo(t).location for t in header.graph.initializer
                    if uses_external_data(t)}
    before = sum(p.stat().st_size for p in old)
    model = _quantize_model(onnx.load(str(file)))  # external weights are read into memory
    for path in old:  # onnx appends external tensors to an existing data file: start from none
        path.unlink()
    onnx.save_model(model, str(file), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{ONNX_FILE}.data", size_threshold=1024)
    after = sum(p.stat().st_size for p in (file, file.parent / f"{ONNX_FILE}.data") if p.is_file())
    ops = [n.op_type for n in model.graph.node]
    return before, after, ops.count("MatMulNBits"), ops.count("MatMul")


def _case(run: Any) -> Int8Case:
    import torch

    valid = run.valid.cpu().to(torch.bool)
    got, ref = run.got.float().cpu()[valid], run.ref.float().cpu()[valid]  # [real positions, vocab]
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > NEAR_TIE * scale
    same = got.argmax(-1) == ref.argmax(-1)
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    return Int8Case(run.batch, run.length, run.past, run.padded_rows, positions=int(valid.sum()),
                    decisive=int(decisive.sum()), agreeing=int((same & decisive).sum()),
                    agreeing_all=int(same.sum()), logit_scale=scale, relative_diff=diff / max(scale, 1e-12))


def int8_parity(module: Any, ort_model: Any, kind: str, vocab: int, mask_id: int | None) -> list[Int8Case]:
    """The fp32 check's cases, measured for int8 (see Int8Case)."""
    import torch

    from .onnx_export import parity_runs

    with torch.inference_mode():
        return [_case(run) for run in parity_runs(module, ort_model, kind, vocab, mask_id)]


def quantize_checked(folder: Path, external: bool, module: Any, kind: str, vocab: int, mask_id: int | None,
                     config: dict, provider: str) -> Quantization:
    """Quantise the checked fp32 graph in ``folder`` to int8 and check it against ``module``;
    a RepskipError (the caller's atomic folder then writes nothing) when it falls short."""
    from ..runtime import load_onnx_model

    before, after, quantized, left = quantize_graph(folder, external)
    if not quantized:
        raise RepskipError("int8 quantisation found no MatMul with a constant weight in the graph; nothing was written")
    ort_model = load_onnx_model(Path(folder) / ONNX_FILE, config, provider)
    cases = int8_parity(module, ort_model, kind, vocab, mask_id)
    del ort_model  # release the session (and its file handles) before the folder moves
    decisive = sum(c.decisive for c in cases)
    agreement = sum(c.agreeing for c in cases) / decisive if decisive else 1.0
    worst = max(cases, key=lambda c: c.relative_diff if c.relative_diff == c.relative_diff else float("inf"))
    record = Quantization(
        method="onnxruntime MatMulNBits (matmul_nbits_quantizer, round to nearest)",
        weight_type="int8 symmetric (stored as uint8, zero point 128)",
        op_types=["MatMul"], per_channel=False, block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL,
        activations="fp32 in and out; int8 per block at run time", quantized_nodes=quantized, float_nodes=left,
        bytes_before=before, bytes_after=after,
        agreement=agreement, agreement_all=sum(c.agreeing_all for c in cases) / max(sum(c.positions for c in cases), 1),
        max_relative_diff=worst.relative_diff, parity=cases,
    )
    if not (agreement >= MIN_AGREEMENT and worst.relative_diff <= MAX_RELATIVE_DIFF):
        raise RepskipError(
            f"int8 check failed: the int8 graph picks PyTorch's greedy token at {agreement:.1%} of the {decisive} "
            f"positions where PyTorch's choice leads by more than {NEAR_TIE:g} of the logit scale (at least "
            f"{MIN_AGREEMENT:.0%} required), and differs from it by up to {worst.relative_diff:.3g} of the logit "
            f"scale (at most {MAX_RELATIVE_DIFF:g}; batch {worst.batch}, length {worst.length}, past {worst.past}); "
            "nothing was written"
        )
    return record
