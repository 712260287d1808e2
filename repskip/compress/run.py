"""The compress stage: write a model without a resolved recipe's layers, as a safetensors
checkpoint (at file level, shard by shard) or an ONNX graph checked against PyTorch.

It takes a recipe that already names its layers; choosing them (the analysis, the loss search,
the repair fit) is the stage before, run by ``repskip.pipeline.resolve_recipe``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import card
from .. import recipe as _recipe
from ..engine.model import ModelHandle, open_model
from ..errors import RepskipError
from ..family import validate_kept
from ..outputs import check_output
from .files import DEFAULT_SHARD_SIZE, write_pruned

FORMATS = ("safetensors", "onnx")


def repair_folds(handle: ModelHandle, maps: dict) -> dict[str, Any]:
    """Tensor name -> (map, axis), for the file-level fold in compress (weights, and biases
    if any)."""
    fam, config = handle.family, handle.ckpt.config
    folds = {}
    for anchor, t in maps.items():
        targets = fam.mlp_output_tensors(config, anchor, handle.ckpt.tensors)
        if not targets:
            raise RepskipError(f"the repair folds into layer {anchor}, whose MLP output tensors this checkpoint lacks")
        folds.update({name: (t, axis) for name, axis in targets})
    return folds


def check_options(output: Path, *, force: bool = False, format: str = "safetensors", opset: int = 18,
                  export_dtype: str = "fp32", provider: str = "cpu", handle: ModelHandle | None = None,
                  quantize: str = "none") -> None:
    """The refusals ``compress`` can make from its output arguments alone, made before any
    long work (an analysis, an export) starts."""
    from .quantize import check_quantize

    if format not in FORMATS:
        raise RepskipError(f"unknown output format {format!r}; choose {' or '.join(FORMATS)}")
    check_quantize(quantize, format, export_dtype)
    check_output(output, force, [handle.path] if handle else [])
    if format == "onnx":
        from .onnx_export import check_options as check_onnx

        check_onnx(opset, export_dtype, provider)


def compress(
    model: str | Path | ModelHandle,
    recipe: _recipe.Recipe | str | Path,
    output: str | Path,
    *,
    maps: dict | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    format: str = "safetensors",
    opset: int = 18,
    export_dtype: str = "fp32",
    provider: str = "cpu",
    parity_tolerance: float | None = None,
    quantize: str = "none",
    status: Callable[[str], None] | None = None,
) -> tuple[Any, _recipe.Recipe]:
    """Write ``model`` without the resolved recipe's layers to ``output``: a safetensors
    checkpoint (a CompressResult) or, with ``format="onnx"``, an ONNX graph checked against
    PyTorch on ``provider`` (an OnnxExportResult; see repskip.compress.onnx_export), with int8
    weights for ``quantize="int8"`` (repskip.compress.quantize). The repair
    maps folded in are ``maps`` (anchor layer -> T) when given, else the recipe's own file's.
    Returns the result and the recipe written beside the weights."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    handle.require_weights("compress")
    if not isinstance(recipe, _recipe.Recipe):
        recipe = _recipe.load(recipe)
    output = Path(output)
    _recipe.check_kind(recipe, handle)
    if not recipe.is_resolved:
        raise RepskipError("compress takes a resolved recipe (the layers to remove); resolve this one first with "
                           "'repskip analyze', or 'repskip compress', which resolves it as a step of its own")
    removed = _recipe.removed_layers(recipe, handle)
    kept = validate_kept(handle.num_layers, removed)
    check_options(output, force=force, format=format, opset=opset, export_dtype=export_dtype, provider=provider,
                  handle=handle, quantize=quantize)
    if maps is None:
        maps = recipe.repair_maps(handle.family.hidden_size(handle.ckpt.config))
    resolved = _stamped(recipe, handle)
    new_config = handle.family.rewrite_config(handle.ckpt.config, kept)
    if format == "onnx":
        from .onnx_export import export_onnx

        onnx_result = export_onnx(handle, kept, new_config, resolved.to_yaml(), output, opset=opset,
                                  dtype=export_dtype, provider=provider, tolerance=parity_tolerance, force=force,
                                  status=status, maps=maps, quantize=quantize)
        return onnx_result, resolved
    recipe_yaml = resolved.to_yaml()
    card_text = card.compress_card(handle, [i for i in range(handle.num_layers) if i not in set(kept)], recipe_yaml,
                                   name=output.name)
    result = write_pruned(
        handle.ckpt,
        prefix=handle.family.layer_prefix(handle.ckpt.config),
        num_layers=handle.num_layers,
        kept=kept,
        new_config=new_config,
        output=output,
        recipe_yaml=recipe_yaml,
        max_shard_size=max_shard_size,
        force=force,
        folds=repair_folds(handle, maps),
        finish=lambda tmp: card.write(tmp, output, card_text),
    )
    return result, resolved


def _stamped(recipe: _recipe.Recipe, handle: ModelHandle) -> _recipe.Recipe:
    """The recipe to write beside the weights: a hand-written one gains the versions that
    exported it and the model it was cut from (so verify can tell); a repair keeps its record,
    its maps being folded into the weights."""
    assert recipe.resolved is not None
    stamp: dict[str, Any] = {}
    if not recipe.resolved.versions:
        from ..versions import versions

        stamp["versions"] = versions()
    if recipe.resolved.model is None:
        stamp["model"] = _recipe.ModelRef(fingerprint=handle.ckpt.fingerprint(), family=handle.family_name,
                                          model_type=handle.ckpt.config.get("model_type"), name_or_path=str(handle.path))
    if recipe.resolved.repair is not None:
        stamp["repair"] = recipe.resolved.repair.model_copy(update={"file": None})
    if not stamp:
        return recipe
    return recipe.model_copy(update={"resolved": recipe.resolved.model_copy(update=stamp)})


def export_as_is(
    model: str | Path | ModelHandle,
    output: str | Path,
    *,
    force: bool = False,
    opset: int = 18,
    export_dtype: str = "fp32",
    provider: str = "cpu",
    parity_tolerance: float | None = None,
    quantize: str = "none",
    status: Callable[[str], None] | None = None,
) -> Any:
    """Export ``model`` to ONNX keeping every layer (a model compressed or healed before);
    the recipe it carries, if any, goes with it."""
    from .onnx_export import export_onnx

    handle = model if isinstance(model, ModelHandle) else open_model(model)
    handle.require_weights("compress")
    check_options(Path(output), force=force, format="onnx", opset=opset, export_dtype=export_dtype,
                  provider=provider, handle=handle, quantize=quantize)
    return export_onnx(handle, list(range(handle.num_layers)), handle.ckpt.config, None, Path(output), opset=opset,
                       dtype=export_dtype, provider=provider, tolerance=parity_tolerance, force=force, status=status,
                       quantize=quantize)
