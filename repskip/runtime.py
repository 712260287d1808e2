"""Exported ONNX models run by ONNX Runtime behind the interface samplers already use.

An exported folder holds ``model.onnx`` with one of two signatures, told apart by its inputs:

- ``causal-lm-with-past`` (autoregressive families), in Hugging Face Optimum's naming:
  ``input_ids``, ``attention_mask`` [batch, past + new], ``position_ids`` and
  ``past_key_values.N.key`` / ``.value`` [batch, kv_heads, past, head_dim] in (heads and head
  dims may differ between layers, and between keys and values);
  ``logits`` and ``present.N.key`` / ``.value`` [batch, kv_heads, past + new, head_dim] out.
- ``masked-lm`` (diffusion families): ``input_ids`` and ``attention_mask`` in, ``logits`` out,
  exactly as the PyTorch module returns them (Dream's logits stay shifted; its family plugin
  realigns them, as it does for the PyTorch model).

:class:`OrtCausalLM` and :class:`OrtMaskedLM` are ``torch.nn.Module``s that take and return
torch tensors, so a sampler drives them as it drives the PyTorch model (forward hooks, and so
forward counting, included). Every run goes through an IO binding on torch-allocated buffers:
on CUDA the KV cache and logits stay on the GPU between steps, with no host copies.
"""

from __future__ import annotations

import itertools

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RepskipError
from .formats import CAUSAL, MASKED, ONNX_FILE

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
# IO-binding element types: numpy names, and ONNX's enum for bf16, which numpy lacks
# (TensorProto.BFLOAT16 = 16).
_BIND_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
               torch.bfloat16: 16}


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a clear error saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise RepskipError(
            "ONNX models need onnxruntime: pip install 'repskip[onnx]' (or 'repskip[onnx-gpu]' on a CUDA "
            "machine, which brings onnxruntime-gpu)"
        ) from None
    return onnxruntime


def model_device(model: Any) -> torch.device:
    """Where a model wants its input tensors: a PyTorch module or an ONNX Runtime one. The
    device of its first tensor that is not on the meta device: one whose layers accelerate
    keeps on disk has its embeddings there too, and computes where its norms are."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def model_dtype(model: Any) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def check_provider(provider: str) -> None:
    """Refuse a provider name that is unknown, or asked for and not installed."""
    ort = require_onnxruntime()
    if provider not in ("auto", *PROVIDERS):
        raise RepskipError(f"unknown execution provider {provider!r}; choose auto, cpu or cuda")
    available = ort.get_available_providers()
    if provider == "cuda" and PROVIDERS["cuda"] not in available:
        raise RepskipError(
            f"execution provider CUDAExecutionProvider was asked for but this onnxruntime "
            f"({ort.__version__}) has only {', '.join(p for p in available if p != 'AzureExecutionProvider')}: "
            "install onnxruntime-gpu in place of onnxruntime (pip install 'repskip[onnx-gpu]'), or use --provider cpu"
        )


class OrtSession:
    """An onnxruntime session on one execution provider, run through IO bindings."""

    def __init__(self, path: Path, provider: str = "auto", threads: int | None = None, spinning: bool = True):
        ort = require_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise RepskipError(f"{path} does not exist; export the model with 'repskip compress --format onnx'")
        check_provider(provider)
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if provider in ("auto", "cuda") and PROVIDERS["cuda"] in available:
            wanted.insert(0, PROVIDERS["cuda"])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's own warnings are not for the user
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # idle threads sleep at once: fairer beside other sessions or torch
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RepskipError(
                f"{path} is not a loadable ONNX model ({first[:200]}); re-export it with "
                "'repskip compress MODEL --recipe R --format onnx --force'"
            ) from None
        used = self.session.get_providers()[0]
        if provider == "cuda" and used != PROVIDERS["cuda"]:
            raise RepskipError(
                "CUDAExecutionProvider is installed but could not start (no usable GPU or CUDA libraries); "
                "use --provider cpu"
            )
        if provider == "auto" and used != PROVIDERS["cuda"] and torch.cuda.is_available():
            # auto on a machine with no GPU is plain CPU, nothing to say; with one, say why not
            reason = ("onnxruntime-gpu is not installed (pip install 'repskip[onnx-gpu]')"
                      if PROVIDERS["cuda"] not in available else "its CUDA libraries could not start")
            where = path.parent if path.name == ONNX_FILE else path
            warnings.warn(f"ONNX Runtime runs {where} on CPUExecutionProvider although a CUDA GPU is present: "
                          f"{reason}", stacklevel=2)
        self.provider = "cuda" if used == PROVIDERS["cuda"] else "cpu"
        # Tensors live on the GPU only when torch can put them there; otherwise ORT copies.
        on_gpu = self.provider == "cuda" and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}

    def type_of(self, name: str) -> torch.dtype:
        arg = self.inputs.get(name) or self.outputs[name]
        if arg.type not in _ORT_TYPES:
            raise RepskipError(f"{name} has type {arg.type}, which repskip's ONNX runtime does not handle")
        return _ORT_TYPES[arg.type]

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run with every input and output bound to the given tensors' memory (filled in place)."""
        binding = self.session.io_binding()
        kind = self.device.type
        index = self.device.index or 0
        keep = []  # contiguous copies must outlive the run
        for name, tensor in inputs.items():
            shape = tuple(tensor.shape)
            tensor = tensor.to(self.device).contiguous()
            if tensor.numel() == 0:  # an empty past: point at a real (unread) element, not at null
                tensor = torch.empty(1, dtype=tensor.dtype, device=self.device)
            keep.append(tensor)
            binding.bind_input(name, kind, index, _BIND_TYPES[tensor.dtype], shape, tensor.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, kind, index, _BIND_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        if kind == "cuda":  # torch wrote the inputs on its own stream: finish before ORT reads them
            torch.cuda.synchronize(self.device)
        self.session.run_with_iobinding(binding)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class _OrtLM(torch.nn.Module):
    """What both graph kinds share: the session, the config, and the logits' shape and type."""

    def __init__(self, session: OrtSession, config: dict):
        super().__init__()
        self.session = session
        self.config = config
        self.repskip_config = config  # samplers read the mask token, context and EOS from it
        vocab = session.outputs["logits"].shape[-1]
        self.vocab = int(vocab) if isinstance(vocab, int) else int(config["vocab_size"])
        self.dtype = session.type_of("logits")
        self.device = session.device


class OrtCausalLM(_OrtLM):
    """A ``causal-lm-with-past`` graph: one call per prefill or decode step."""

    signature = CAUSAL

    def __init__(self, session: OrtSession, config: dict):
        super().__init__(session, config)
        names = sorted((n for n in session.inputs if n.startswith("past_key_values.") and n.endswith(".key")),
                       key=lambda n: int(n.split(".")[1]))
        self.num_layers = len(names)
        # (heads, head dim) of each layer's keys and values: layers may differ
        self.kv_shapes = [tuple((int(session.inputs[f"past_key_values.{i}.{part}"].shape[1]),
                                 int(session.inputs[f"past_key_values.{i}.{part}"].shape[3]))
                                for part in ("key", "value")) for i in range(self.num_layers)]
        self.kv_dtype = session.type_of(names[0]) if names else self.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None) -> CausalLMOutput:
        B, T = input_ids.shape
        past = past_key_values or ()
        P = past[0][0].shape[2] if past else 0
        dev = self.device
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=dev)
        if position_ids is None:  # as transformers' forward does: consecutive from the past length
            position_ids = torch.arange(P, P + T, device=dev).expand(B, T)
        feeds = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long(),
                 "position_ids": position_ids.long()}
        for i, shapes in enumerate(self.kv_shapes):
            key, value = past[i] if past else (torch.empty(B, h, 0, d, dtype=self.kv_dtype, device=dev) for h, d in shapes)
            feeds[f"past_key_values.{i}.key"] = key
            feeds[f"past_key_values.{i}.value"] = value
        logits = torch.empty(B, T, self.vocab, dtype=self.dtype, device=dev)
        outs = {"logits": logits}
        present = []
        for i, ((kh, kd), (vh, vd)) in enumerate(self.kv_shapes):
            k = torch.empty(B, kh, P + T, kd, dtype=self.kv_dtype, device=dev)
            v = torch.empty(B, vh, P + T, vd, dtype=self.kv_dtype, device=dev)
            outs[f"present.{i}.key"], outs[f"present.{i}.value"] = k, v
            present.append((k, v))
        self.session.run(feeds, outs)
        return CausalLMOutput(logits, tuple(present))


class OrtMaskedLM(_OrtLM):
    """A ``masked-lm`` graph: the whole sequence in, logits for every position out."""

    signature = MASKED

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head_window: tuple[int, int] | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=self.device)
        logits = torch.empty(B, T, self.vocab, dtype=self.dtype, device=self.device)
        self.session.run({"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}, {"logits": logits})
        if head_window is not None:  # the graph computes every position; keep the asked-for ones
            logits = logits[:, head_window[0]:head_window[1]]
        return logits


def load_onnx_model(path: Path, config: dict, provider: str = "auto", threads: int | None = None,
                    spinning: bool = True) -> torch.nn.Module:
    """The model in an exported folder (or a bare .onnx file) on an ONNX Runtime session."""
    path = Path(path)
    file = path / ONNX_FILE if path.is_dir() else path
    session = OrtSession(file, provider, threads, spinning)
    names = set(session.inputs)
    if "input_ids" not in names or "logits" not in session.outputs:
        raise RepskipError(f"{file} has inputs {sorted(names)} and outputs {sorted(session.outputs)}; repskip runs "
                           "graphs with input_ids in and logits out")
    model = OrtCausalLM(session, config) if any(n.startswith("past_key_values.") for n in names) else OrtMaskedLM(session, config)
    gen_file = (path if path.is_dir() else path.parent) / "generation_config.json"
    model.generation_settings = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    return model.eval()


# --- transformers' KV cache under either name -------------------------------------------------
def cache_kwarg(model: Any) -> str:
    """The keyword a transformers model's forward takes its KV cache by: ``cache`` since
    transformers renamed it (5.x), ``past_key_values`` before (the old name still works there,
    with a deprecation warning on every run)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned: ``out.cache`` where transformers names it so, else
    ``out.past_key_values`` (older transformers, and repskip's ONNX Runtime models)."""
    value = getattr(out, "cache", None)
    return value if value is not None else out.past_key_values
