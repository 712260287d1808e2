"""The library calls behind each CLI command: analyze, resolve, compress, flops, generate.

Each takes a model argument (a local folder or a Hugging Face Hub id) and returns plain
results; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import analysis as _analysis
from . import calibration
from . import recipe as _recipe
from .checkpoint import Checkpoint, open_checkpoint, resolve_model
from .compress import DEFAULT_SHARD_SIZE, CompressResult, write_pruned
from .errors import RepskipError
from .family import Family, find_family, validate_kept
from .flops import FlopsComparison, compare

DTYPES = {
    "auto": None,
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise RepskipError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RepskipError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu")
    return name


@dataclass
class ModelHandle:
    """A checkpoint on disk and the family that understands it."""

    path: Path
    ckpt: Checkpoint
    family_name: str
    family: Family

    @property
    def num_layers(self) -> int:
        return self.family.num_layers(self.ckpt.config)

    def info(self) -> dict:
        return {
            "path": str(self.path),
            "family": self.family_name,
            "model_type": self.ckpt.config.get("model_type"),
            "fingerprint": self.ckpt.fingerprint(),
            "num_layers": self.num_layers,
        }


def open_model(model: str | Path, family: str | None = None) -> ModelHandle:
    path = resolve_model(model)
    ckpt = open_checkpoint(path)
    name, fam = find_family(ckpt.config, family)
    return ModelHandle(path, ckpt, name, fam)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def analyze(
    model: str | Path | ModelHandle,
    *,
    calib: str | Path | None = None,
    calib_field: str | None = None,
    num_samples: int = 64,
    max_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    positions: str = "all",
    max_distance: int = 64,
    dtype: str | None = None,
    device: str = "cpu",
    family: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> _analysis.Analysis:
    """Measure every layer of ``model`` on calibration text (see repskip.analysis)."""
    handle = model if isinstance(model, ModelHandle) else open_model(model, family)
    device = parse_device(device)
    torch_model = handle.family.load(handle.path, parse_dtype(dtype), device)
    tokenizer = handle.family.load_tokenizer(handle.path)
    calib_set = calibration.build(
        tokenizer, calib, field=calib_field, num_samples=num_samples, max_length=max_length, seed=seed
    )
    acc = _analysis.collect(
        torch_model,
        handle.family,
        calib_set,
        pad_id=_pad_id(tokenizer),
        batch_size=batch_size,
        positions=positions,
        max_distance=max_distance,
        progress=progress,
    )
    settings = {
        "positions": positions,
        "batch_size": batch_size,
        "seed": seed,
        "max_distance": max_distance,
        "dtype": str(next(torch_model.parameters()).dtype).replace("torch.", ""),
        "device": device,
    }
    return _analysis.build_result(acc, model_info=handle.info(), calib=calib_set, settings=settings)


def resolve_recipe(
    recipe: _recipe.Recipe,
    model: str | Path | ModelHandle,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[_recipe.Recipe, _analysis.Analysis | None]:
    """The recipe with its layers chosen for ``model`` (running the analysis if needed)."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    if recipe.is_resolved:
        _recipe.check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
        return recipe, None
    assert recipe.selection is not None
    cal = recipe.calibration
    result = analyze(
        handle,
        calib=cal.source,
        calib_field=cal.field,
        num_samples=cal.num_samples,
        max_length=cal.max_length,
        batch_size=cal.batch_size,
        seed=cal.seed,
        positions=recipe.selection.positions,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    return _recipe.resolve(recipe, result), result


def compress(
    model: str | Path | ModelHandle,
    recipe: _recipe.Recipe | str | Path,
    output: str | Path,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[CompressResult, _recipe.Recipe]:
    """Write ``model`` without the recipe's layers to ``output`` (safetensors)."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    if not isinstance(recipe, _recipe.Recipe):
        recipe = _recipe.load(recipe)
    output = Path(output)
    if output.exists() and not force:  # fail before a long analysis, not after it
        raise RepskipError(f"output {output} already exists; pass --force to replace it")
    resolved, _ = resolve_recipe(recipe, handle, dtype=dtype, device=device, progress=progress)
    assert resolved.resolved is not None
    kept = validate_kept(handle.num_layers, resolved.resolved.remove)
    new_config = handle.family.rewrite_config(handle.ckpt.config, kept)
    result = write_pruned(
        handle.ckpt,
        prefix=handle.family.layer_prefix(handle.ckpt.config),
        num_layers=handle.num_layers,
        kept=kept,
        new_config=new_config,
        output=output,
        recipe_yaml=resolved.to_yaml(),
        max_shard_size=max_shard_size,
        force=force,
    )
    return result, resolved


def flops(
    model: str | Path | ModelHandle, removed: Sequence[int], seq_len: int = 512
) -> FlopsComparison:
    """Analytic FLOPs of ``model`` with and without the ``removed`` layers."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    validate_kept(handle.num_layers, removed)
    return compare(handle.family.geometry(handle.ckpt.config), len(removed), seq_len)


def removed_layers(recipe: _recipe.Recipe, handle: ModelHandle) -> list[int]:
    """The layers a resolved recipe removes, checked against the model."""
    if not recipe.is_resolved:
        raise RepskipError(
            "this recipe is unresolved (it says how to choose, not which layers): run "
            "'repskip analyze' or 'repskip compress' first, or pass a resolved recipe"
        )
    _recipe.check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
    assert recipe.resolved is not None
    return list(recipe.resolved.remove)
