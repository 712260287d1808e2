"""Opening a model: a checkpoint folder (or Hub id) and the family that runs it, and the
settings that say where and in what precision it runs. Loading the weights is the family's
(transformers' for Hugging Face decoders); the stages get a ModelHandle and ask it."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, open_checkpoint, read_config, resolve_model
from ..errors import RepskipError
from ..family import Family, find_family

# torch is imported only where a model runs: compressing files never needs it.
DTYPES = {
    "auto": None,
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}


def parse_dtype(name: str | None) -> Any:
    if name is None:
        return None
    if name not in DTYPES:
        raise RepskipError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if DTYPES[name] is None:
        return None
    import torch

    return getattr(torch, DTYPES[name])


DEVICE_HINT = "use cpu, cuda, cuda:N or auto"


def check_device_name(name: str) -> str:
    """Refuse a device name that can never work, without importing torch."""
    import re

    if name not in ("cpu", "auto") and not re.fullmatch(r"cuda(:\d+)?", str(name)):
        raise RepskipError(f"unknown device {name!r}; {DEVICE_HINT}")
    return name


def parse_device(name: str) -> str:
    """A device torch can run on here: cpu, auto (CUDA when present), cuda or cuda:N."""
    if check_device_name(name) == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise RepskipError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RepskipError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


@dataclass
class ModelHandle:
    """A checkpoint on disk (safetensors, or an exported ONNX folder) and its family."""

    path: Path
    ckpt: Checkpoint
    family_name: str
    family: Family
    onnx: bool = False

    @property
    def num_layers(self) -> int:
        return self.family.num_layers(self.ckpt.config)

    def info(self) -> dict:
        return {
            "path": str(self.path),
            "family": self.family_name,
            "model_type": self.ckpt.config.get("model_type"),
            "fingerprint": None if self.onnx else self.ckpt.fingerprint(),
            "num_layers": self.num_layers,
            "format": "onnx" if self.onnx else "safetensors",
        }

    def load(self, dtype: str | None = None, device: str = "cpu", device_map: str | None = None,
             provider: str = "auto", offload_folder: Path | None = None, max_memory: int | None = None) -> Any:
        """The runnable model: the family's torch module, or an ONNX Runtime session behind
        the same interface for an exported ONNX folder (``provider``: auto, cpu or cuda).
        With ``device_map``, ``max_memory`` bytes caps the device's share and what does not fit
        goes to ``offload_folder`` (accelerate's big-model inference)."""
        if not self.onnx:
            big = {}
            if device_map and offload_folder is not None:
                big["offload_folder"] = offload_folder
            if device_map and max_memory is not None:
                place = parse_device(device)
                big["max_memory"] = {int(place.partition(":")[2] or 0) if place.startswith("cuda") else "cpu": max_memory}
            return self.family.load(self.path, parse_dtype(dtype), parse_device(device), device_map=device_map, **big)
        from ..runtime import load_onnx_model

        if dtype not in (None, "auto"):
            raise RepskipError(f"{self.path.name} is an ONNX export: it runs in the dtype it was exported in; drop --dtype")
        if device_map:
            raise RepskipError(f"{self.path.name} is an ONNX export: --device-map is for PyTorch checkpoints")
        return load_onnx_model(self.path, self.ckpt.config, provider)

    def require_weights(self, what: str) -> None:
        """Refuse work that needs the PyTorch checkpoint on an ONNX export."""
        if self.onnx:
            raise RepskipError(f"{what} needs the original safetensors checkpoint; {self.path} is an ONNX export")


_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("repskip_trust_remote_code", default=False)


@contextlib.contextmanager
def trusting_remote_code(trust: bool = True) -> Iterator[None]:
    """Within the block, ``open_model`` lets a checkpoint run the modeling code it ships
    (``auto_map``), as transformers' ``trust_remote_code=True`` does: only for code you trust.
    The CLI's --trust-remote-code sets it for one command."""
    token = _TRUST_REMOTE_CODE.set(trust)
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def open_model(model: str | Path, family: str | None = None, allow_onnx: bool = False,
               trust_remote_code: bool | None = None) -> ModelHandle:
    """A model folder (or Hub id) and its family; ``allow_onnx`` also takes an exported ONNX
    folder, for the commands that can run one (generate, verify, flops). A checkpoint's own
    modeling code runs only with ``trust_remote_code`` (default: as ``trusting_remote_code``
    says, which is no)."""
    from ..consistency import check_checkpoint
    from ..formats import ONNX_FILE, is_onnx_folder

    trust = _TRUST_REMOTE_CODE.get() if trust_remote_code is None else trust_remote_code
    path = resolve_model(model)
    if path.is_dir() and is_onnx_folder(path) and not any(path.glob("*.safetensors")):
        if not allow_onnx:
            raise RepskipError(
                f"{path} is an ONNX export; this command needs the safetensors checkpoint it was exported from"
            )
        config = read_config(path)
        name, fam = find_family(config, family)
        fam = fam.for_checkpoint(path, trust)
        return ModelHandle(path, Checkpoint(path, config, [path / ONNX_FILE], {}, None), name, fam, onnx=True)
    ckpt = open_checkpoint(path)
    name, fam = find_family(ckpt.config, family)
    fam = fam.for_checkpoint(path, trust)
    check_checkpoint(ckpt, fam, name)  # config.json and weights agree, before any work
    return ModelHandle(path, ckpt, name, fam)


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end of text, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
