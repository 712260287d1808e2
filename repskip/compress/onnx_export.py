"""Export of a pruned model to ONNX, checked against PyTorch before it is kept.

The family plugin gives a torch module with the signature of its kind (Family.onnx_module);
this module traces it with torch.onnx's dynamo exporter (dynamic batch and length, constant
folding and dead-code elimination by its optimiser), drops any initializer no node reads,
checks the graph, and runs a parity check on shapes other than the tracing example: batch 1
and 3, several lengths, left padding and (autoregressive) a decode step on a real KV cache.
ONNX Runtime must agree with PyTorch within the tolerance, or nothing is written.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import RECIPE_NAME, copy_side_files
from ..errors import RepskipError
from ..outputs import atomic_dir
from ..formats import CAUSAL, MASKED, META_FILE, ONNX_FILE
from ..runtime import check_provider, load_onnx_model

SCHEMA_VERSION = 1
MIN_OPSET = 18
EXPORT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# Parity tolerance: atol + rtol * (largest |logit| of the reference), by export dtype. fp32
# from measurements (docs/onnx.md): SmolLM2-135M differs by at most 9e-5 (5e-6 of its logit
# scale); Qwen2.5-Coder-0.5B-Instruct by 5.15e-3 on a padded decode case (2.7e-4 of a logit
# scale of about 19) with identical greedy text. An export bug (a wrong mask, position or
# cache layout) moves logits by a sizeable fraction of their scale, far beyond 1e-3 of it.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.float16: (2e-2, 1e-2), torch.bfloat16: (5e-2, 3e-2)}


def max_opset() -> int:
    """The newest opset the installed torch exporter writes natively."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET

        return int(ONNX_MAX_OPSET)
    except ImportError:  # pragma: no cover - the constant moved
        return MIN_OPSET


def check_options(opset: int, dtype: str, provider: str = "cpu") -> torch.dtype:
    """Refuse an opset or dtype the export cannot honour, before any work is done."""
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise RepskipError(
            f"opset {opset} is not supported: repskip exports opset {MIN_OPSET} to {top} "
            f"(torch {torch.__version__}); pass --opset in that range"
        )
    if dtype not in EXPORT_DTYPES:
        raise RepskipError(f"unknown export dtype {dtype!r}; choose fp32, fp16 or bf16")
    if EXPORT_DTYPES[dtype] == torch.bfloat16 and provider != "cuda":
        raise RepskipError(
            "a bf16 graph runs on CUDAExecutionProvider only (ONNX Runtime's CPU provider has no bf16 kernels), "
            "so its parity check must run there: pass --provider cuda on a GPU machine with onnxruntime-gpu, "
            "or export fp16"
        )
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise RepskipError(
                f"ONNX export needs {module}: pip install 'repskip[onnx]' (or 'repskip[onnx-gpu]' on a CUDA machine)"
            ) from None
    check_provider(provider)
    return EXPORT_DTYPES[dtype]


@dataclass
class ParityCase:
    batch: int
    length: int
    past: int
    padded_rows: int
    max_abs_diff: float
    present_max_abs_diff: float | None = None
    # positions whose greedy token differs although PyTorch's choice leads by more than the
    # default tolerance's near-tie margin (must be 0, whatever --parity-tolerance says)
    greedy_flips: int = 0


@dataclass
class OnnxExportResult:
    output: Path
    kept: list[int]
    removed: list[int]
    signature: str
    opset: int
    dtype: str
    provider: str
    onnx_bytes: int
    external_data: bool
    dropped_initializers: int
    tolerance: float
    parity: list[ParityCase] = field(default_factory=list)
    quantization: Any = None  # a repskip.compress.quantize.Quantization for --quantize int8

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff if c.present_max_abs_diff is None else max(c.max_abs_diff, c.present_max_abs_diff)
                   for c in self.parity)


# --- the graph ---------------------------------------------------------------------------
def _io(kind: str, num_layers: int) -> tuple[list[str], list[str]]:
    if kind == CAUSAL:
        pairs = [(i, part) for i in range(num_layers) for part in ("key", "value")]
        return (["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{p}" for i, p in pairs)],
                ["logits", *(f"present.{i}.{p}" for i, p in pairs)])
    return ["input_ids", "attention_mask"], ["logits"]


def _example(kind: str, module: Any, vocab: int, dtype: torch.dtype) -> tuple:
    """Tracing inputs: batch 2, 4 new tokens on 3 past ones (sizes the parity check avoids).
    The past keys and values take the shapes the module's ``kv_shapes`` gives, layer by layer
    ([heads, head dim] of each key and each value)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 4), generator=gen)
    if kind == MASKED:
        return ids, torch.ones(2, 4, dtype=torch.long)
    past = tuple(torch.randn(2, heads, 3, dim, generator=gen).to(dtype)
                 for key, value in module.kv_shapes() for heads, dim in (key, value))
    return ids, torch.ones(2, 7, dtype=torch.long), torch.arange(3, 7).expand(2, 4), past


def _dynamic_shapes(kind: str, num_layers: int) -> tuple:
    from torch.export import Dim

    batch, length = Dim("batch"), Dim("sequence_length")
    if kind == MASKED:
        return {0: batch, 1: length}, {0: batch, 1: length}
    past, total = Dim("past_sequence_length"), Dim("total_sequence_length")
    return ({0: batch, 1: length}, {0: batch, 1: total}, {0: batch, 1: length},
            tuple({0: batch, 2: past} for _ in range(2 * num_layers)))


def _export(module: torch.nn.Module, kind: str, example: tuple, num_layers: int, opset: int, path: Path,
            external_data: bool | None) -> None:
    inputs, outputs = _io(kind, num_layers)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, example, None, input_names=inputs, output_names=outputs,
                dynamic_shapes=_dynamic_shapes(kind, num_layers), opset_version=opset, dynamo=True,
                optimize=True, verbose=False,
            )
    except RepskipError:
        raise
    except Exception as exc:
        raise RepskipError(f"torch.onnx could not export the model ({_reason(exc)}); nothing was written") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    program.save(str(path), external_data=external_data)


def _reason(exc: BaseException) -> str:
    """The line of a torch.onnx error that names the cause (its first line is boilerplate)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    summary = [line for line in lines if line.startswith("<class '")]
    cause = summary[0] if summary else next((line for line in lines if line), type(exc).__name__)
    return cause[:300]


def _clean_graph(path: Path) -> tuple[int, bool]:
    """Remove initializers no node reads (a removed layer's weights must not ride along) and
    the exporter's per-node debug records (stack traces naming local source paths, which
    outweigh the graph itself on a small model). Returns how many initializers were dropped
    and whether the weights live in external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    used: set[str] = set()

    def visit(graph) -> None:
        for node in graph.node:
            used.update(node.input)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)
        used.update(o.name for o in graph.output)

    visit(model.graph)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    dead = [t for t in model.graph.initializer if t.name not in used]
    if not external:  # rewriting external data is the exporter's job (its DCE already ran)
        for t in dead:
            model.graph.initializer.remove(t)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))  # external tensors keep their references: only the graph is rewritten
    onnx.checker.check_model(str(path))
    return (0 if external else len(dead)), external


# --- parity ------------------------------------------------------------------------------
def _left_pad(batch: int, length: int, pads: Sequence[int]) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def _diff(got: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> float:
    """Largest |difference| over the positions that are real tokens (padding rows' outputs are
    whatever each runtime makes of a query with nothing to attend to)."""
    d = (got.float().cpu() - ref.float().cpu()).abs()  # ORT's outputs may sit on the GPU
    while valid.dim() < d.dim():
        valid = valid.unsqueeze(-1)
    valid = valid.cpu()
    return float(d.masked_select(valid.expand_as(d).to(torch.bool)).max()) if valid.any() else 0.0


def _flips(got: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor, near_tie: float) -> int:
    """Real positions where ORT's greedy token differs from PyTorch's although PyTorch's
    own logit for it trails its choice by more than ``near_tie``."""
    got, ref = got.float().cpu(), ref.float().cpu()
    choice = got.argmax(-1, keepdim=True)
    lead = ref.max(-1).values - ref.gather(-1, choice).squeeze(-1)
    valid = valid.cpu().to(torch.bool).expand_as(lead)
    return int(((lead > near_tie) & valid).sum())


@dataclass
class ParityRun:
    """One parity case as run: the logits ONNX Runtime and PyTorch gave for the same input,
    and which positions are real tokens (1) rather than padding (0)."""

    batch: int
    length: int
    past: int
    padded_rows: int
    got: torch.Tensor
    ref: torch.Tensor
    valid: torch.Tensor
    present_max_abs_diff: float | None = None


def parity_runs(module: torch.nn.Module, ort_model: torch.nn.Module, kind: str, vocab: int,
                mask_id: int | None) -> Iterator[ParityRun]:
    """The parity cases, run on ONNX Runtime and on PyTorch: batch 1 and 3, left padding and
    (autoregressive) a decode step on the cache PyTorch made."""
    gen = torch.Generator().manual_seed(1)
    if kind == MASKED:
        for batch, length, pads in ((1, 9, [0]), (3, 16, [0, 5, 11]), (3, 33, [7, 0, 2])):
            ids = torch.randint(0, vocab, (batch, length), generator=gen)
            if mask_id is not None:  # a denoising input: part of each sequence masked
                ids[torch.rand(batch, length, generator=gen) < 0.4] = mask_id
            mask = _left_pad(batch, length, pads)
            yield ParityRun(batch, length, 0, sum(p > 0 for p in pads), ort_model(ids, mask), module(ids, mask), mask)
        return
    for batch, length, pads, step in ((1, 9, [0], 1), (3, 13, [0, 4, 9], 2), (3, 6, [2, 0, 5], 5)):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        mask = _left_pad(batch, length, pads)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        layers = ort_model.num_layers
        empty = tuple(torch.zeros(batch, heads, 0, dim, dtype=ort_model.kv_dtype)
                      for shapes in ort_model.kv_shapes for heads, dim in shapes)
        ref = module(ids, mask, pos, empty)
        got = ort_model(ids, mask, pos)
        yield ParityRun(batch, length, 0, sum(p > 0 for p in pads), got.logits, ref[0], mask)
        # then ``step`` more tokens on the PyTorch cache of that prefill
        new = torch.randint(0, vocab, (batch, step), generator=gen)
        mask2 = torch.cat([mask, torch.ones(batch, step, dtype=torch.long)], dim=1)
        pos2 = pos[:, -1:] + torch.arange(1, step + 1)
        ref2 = module(new, mask2, pos2, ref[1:])
        past = tuple((ref[1 + 2 * i], ref[2 + 2 * i]) for i in range(layers))
        got2 = ort_model(new, mask2, pos2, past)
        present = max(_diff(g, r, mask2[:, None, :])
                      for pair, r2 in zip(got2.past_key_values, zip(ref2[1::2], ref2[2::2])) for g, r in zip(pair, r2))
        yield ParityRun(batch, step, length, sum(p > 0 for p in pads), got2.logits, ref2[0],
                        torch.ones(batch, step), present)


def _parity(module: torch.nn.Module, ort_model: torch.nn.Module, kind: str, vocab: int, mask_id: int | None,
            near_tie: float = 0.0) -> list[ParityCase]:
    return [ParityCase(r.batch, r.length, r.past, r.padded_rows, _diff(r.got, r.ref, r.valid), r.present_max_abs_diff,
                       _flips(r.got, r.ref, r.valid, near_tie))
            for r in parity_runs(module, ort_model, kind, vocab, mask_id)]


# --- the whole export --------------------------------------------------------------------
def export_onnx(
    handle: Any,
    kept: Sequence[int],
    new_config: dict,
    recipe_yaml: str | None,
    output: Path,
    *,
    opset: int = MIN_OPSET,
    dtype: str = "fp32",
    provider: str = "cpu",
    tolerance: float | None = None,
    external_data: bool | None = None,
    force: bool = False,
    status: Callable[[str], None] | None = None,
    maps: dict | None = None,
    quantize: str = "none",
) -> OnnxExportResult:
    """Export ``handle``'s model keeping ``kept`` layers into the folder ``output``, with the
    linear repair ``maps`` (anchor layer -> T) folded in first; ``recipe_yaml`` None keeps
    the recipe file the model's folder has, if any. ``quantize="int8"`` then replaces the
    checked fp32 graph by one with int8 weights, checked in turn (repskip.compress.quantize)."""
    from .quantize import check_quantize

    torch_dtype = check_options(opset, dtype, provider)
    check_quantize(quantize, "onnx", dtype)
    say = status or (lambda _msg: None)
    fam = handle.family
    kind = CAUSAL if fam.generative_kind == "autoregressive" else MASKED
    say("loading the model and removing layers")
    model = fam.load(handle.path, torch_dtype, "cpu")
    if maps:
        from ..repair.fit import fold_in_memory

        fold_in_memory(model, fam, maps)
    fam.remove_layers(model, kept)
    module = fam.onnx_module(model).eval()
    vocab = fam.vocab_size(new_config)
    mask_id = fam.mask_token_id(new_config) if kind == MASKED else None
    removed = [i for i in range(handle.num_layers) if i not in set(kept)]
    with atomic_dir(output, force, [handle.path], command="compress --format onnx") as tmp:
        file = tmp / ONNX_FILE
        say(f"exporting opset {opset}, {dtype}")
        _export(module, kind, _example(kind, module, vocab, torch_dtype), len(kept), opset, file, external_data)
        dropped, external = _clean_graph(file)
        say("checking ONNX Runtime against PyTorch")
        ort_model = load_onnx_model(file, new_config, provider)
        atol, rtol = TOLERANCE[torch_dtype]
        with torch.inference_mode():
            scale = max(float(module(*_example(kind, module, vocab, torch_dtype))[0].abs().max()), 1.0)
            default = atol + rtol * scale
            cases = _parity(module, ort_model, kind, vocab, mask_id, near_tie=2 * default)
        limit = tolerance if tolerance is not None else default
        result = OnnxExportResult(
            output=Path(output), kept=list(kept), removed=removed, signature=kind, opset=opset, dtype=dtype,
            provider=ort_model.session.provider, onnx_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
            external_data=external, dropped_initializers=dropped, tolerance=limit, parity=cases,
        )
        del ort_model  # release the session (and its file handles) before the folder moves
        flips = sum(c.greedy_flips for c in cases)
        if flips:
            worst = max(cases, key=lambda c: c.greedy_flips)
            raise RepskipError(
                f"ONNX parity check failed: ONNX Runtime picks another greedy token than PyTorch at {flips} "
                f"position(s) where PyTorch's choice leads by more than {2 * default:.3g} (first at batch "
                f"{worst.batch}, length {worst.length}, past {worst.past}); the graph computes something else, "
                "whatever the tolerance: nothing was written"
            )
        if result.max_abs_diff > limit or result.max_abs_diff != result.max_abs_diff:
            worst = max(cases, key=lambda c: max(c.max_abs_diff, c.present_max_abs_diff or 0.0))
            raise RepskipError(
                f"ONNX parity check failed: ONNX Runtime differs from PyTorch by {result.max_abs_diff:.3g} "
                f"(tolerance {limit:.3g}) at batch {worst.batch}, length {worst.length}, past {worst.past}; "
                "nothing was written (pass --parity-tolerance to accept a larger difference)"
            )
        if quantize == "int8":
            from .quantize import quantize_checked

            say("quantising the MatMul weights to int8 and checking against PyTorch")
            result.quantization = quantize_checked(tmp, external, module, kind, vocab, mask_id, new_config, provider)
            result.onnx_bytes = result.quantization.bytes_after
        copy_side_files(handle.path, tmp)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        if recipe_yaml is not None:
            (tmp / RECIPE_NAME).write_text(recipe_yaml)
        from .genai import write_genai_config

        genai = write_genai_config(tmp, new_config, fam, handle.path, module.kv_shapes() if kind == CAUSAL else None)
        (tmp / META_FILE).write_text(json.dumps({**metadata(result, fam, handle), "genai_config": genai}, indent=2)
                                     + "\n")
        # the model card last: it says whether the folder has a genai_config.json
        _write_card(tmp, Path(output), handle, removed, recipe_yaml, result.quantization)
    return result


def _write_card(tmp: Path, output: Path, handle: Any, removed: list[int], recipe_yaml: str | None,
                quantization: Any) -> None:
    from .. import card

    genai = (tmp / "genai_config.json").is_file()
    if recipe_yaml is not None:
        text = card.compress_card(handle, removed, recipe_yaml, onnx=True, genai=genai, name=output.name)
    else:
        text = card.as_is_card(handle.path, output.name, genai, handle.family.generative_kind == "autoregressive")
    if quantization is not None:
        q = quantization
        text = card.with_quantization(text, f"Weights of {q.quantized_nodes} MatMuls in int8 ({q.method}, blocks of "
                                            f"{q.block_size}; {q.float_nodes} whose weight is computed stay in float): "
                                            f"{q.bytes_before / 1e6:,.1f} MB -> {q.bytes_after / 1e6:,.1f} MB. Checked "
                                            f"against PyTorch: greedy tokens agree at {q.agreement:.1%} of the decided "
                                            f"positions, logits within {q.max_relative_diff:.3f} of their scale "
                                            "(repskip-onnx.json has every figure).")
    card.write(tmp, output, text)


def metadata(result: OnnxExportResult, fam: Any, handle: Any) -> dict:
    from ..versions import versions

    doc = asdict(result)
    doc["output"] = str(result.output)
    return {
        "schema_version": SCHEMA_VERSION,
        "family": handle.family_name,
        "generative_kind": fam.generative_kind,
        "shifted_logits": bool(getattr(fam, "shifted_logits", False)),
        **{k: v for k, v in doc.items() if k != "output"},
        "max_abs_diff": result.max_abs_diff,
        "versions": versions(("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "transformers")),
    }
