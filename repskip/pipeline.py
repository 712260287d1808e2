"""The library calls behind the CLI, and the step that joins the stages: resolving a recipe
(the analysis, the loss search and the repair fit chose its layers and maps) before compress
writes it.

Each call takes a model argument (a local folder or a Hugging Face Hub id) and returns plain
results; nothing here prints. The stages live in their packages (repskip.analyze,
repskip.repair, repskip.compress, repskip.verify); opening and running a model is
repskip.engine's; the names most used are importable from here as well.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import recipe as _recipe
from .analyze.run import MODES, analyze
from .analyze.selection import LOSS_STRATEGIES
from .compress.run import FORMATS, check_options, compress, export_as_is, repair_folds
from .engine.model import (DTYPES, ModelHandle, check_device_name, open_model, pad_id, parse_device, parse_dtype,
                           trusting_remote_code)
from .errors import RepskipError
from .family import validate_kept
from .flops import FlopsComparison, compare
from .recipe import check_kind, removed_layers

if TYPE_CHECKING:  # the analysis needs torch; opening a model does not
    from .analyze import analysis as _analysis

__all__ = ["DTYPES", "FORMATS", "MODES", "ModelHandle", "analyze", "check_compress", "check_device_name", "check_kind",
           "auto_search", "check_options", "compress", "export_as_is", "fit_repair", "flops", "loss_search", "offload_plan",
           "open_model", "pad_id", "parse_device", "parse_dtype", "removed_layers", "repair_folds", "resolve_recipe",
           "trusting_remote_code", "with_repair"]


def check_calibration(recipe: _recipe.Recipe) -> None:
    """An unresolved recipe is resolved by an analysis on its calibration data: refuse it at
    once, before any model is loaded, when that data cannot be read."""
    if recipe.is_resolved:
        return
    from .analyze import calibration  # imports torch: only for an analysis that will run anyway

    try:
        calibration.load_texts(recipe.calibration.source, recipe.calibration.field)
    except RepskipError as exc:
        raise RepskipError(
            f"the recipe is unresolved and its analysis data cannot be read ({exc}): fix calibration.source, "
            "or pass a resolved recipe (from 'repskip analyze' or 'repskip select')"
        ) from None


def offload_plan(handle: ModelHandle, offload: str = "auto", dtype: str | None = None, device: str = "cpu",
                 tokens: int = 0, max_memory: int | None = None, folder: str | Path | None = None) -> str:
    """"whole" or "sequential" (repskip.engine.offload) for running ``handle`` over ``tokens``
    calibration tokens, or a one-line refusal, before anything is loaded."""
    from .engine import offload as _offload

    return _offload.plan(handle, offload, parse_dtype(dtype), parse_device(device), tokens, max_memory, folder)


def resolve_recipe(
    recipe: _recipe.Recipe,
    model: str | Path | ModelHandle,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    offload: str = "auto",
    max_memory: int | None = None,
    offload_folder: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[_recipe.Recipe, _analysis.Analysis | None, dict]:
    """The recipe with its layers chosen for ``model`` (running the analysis, the loss search
    and the repair fit as the recipe asks, in memory or one layer at a time from disk as
    ``offload`` says: see repskip.engine.offload), the analysis if one ran, and the repair maps
    (anchor layer -> T; from the recipe's file for a resolved recipe, {} without repair)."""
    from .engine import offload as _offload

    handle = model if isinstance(model, ModelHandle) else open_model(model)
    check_kind(recipe, handle)
    if recipe.is_resolved:
        _recipe.check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
        return recipe, None, recipe.repair_maps(handle.family.hidden_size(handle.ckpt.config))
    check_recipe_fits(recipe, handle)
    check_calibration(recipe)
    sel, cal = recipe.selection, recipe.calibration
    assert sel is not None
    if sel.repair != "none":
        from .repair.fit import check_supported

        check_supported(handle.family, handle.ckpt.config)
    tokens = cal.num_samples * cal.max_length
    plan = offload_plan(handle, offload, dtype, device, tokens, max_memory, offload_folder)
    with _offload.loaded(handle, parse_dtype(dtype), parse_device(device), plan=plan, tokens=tokens,
                         max_memory=max_memory, folder=offload_folder, say=say) as torch_model:
        result = analyze(
            handle, calib=cal.source, calib_field=cal.field, num_samples=cal.num_samples, max_length=cal.max_length,
            batch_size=cal.batch_size, seed=cal.seed, positions=sel.positions, mode=sel.mode,
            mask_ratios=sel.mask_ratios, prompt_fraction=sel.prompt_fraction, sampler_settings=sel.sampler,
            chat=sel.chat, dtype=dtype, device=device, progress=progress, torch_model=torch_model,
        )
        if sel.strategy in LOSS_STRATEGIES:
            result.data["search"] = loss_search(handle, torch_model, sel, cal)
        elif sel.strategy == "auto":
            result.data["auto"] = auto_search(handle, torch_model, result, sel, cal)
        resolved = _recipe.resolve(recipe, result)
        assert resolved.resolved is not None
        check_removable(handle, resolved.resolved.remove)
        maps: dict = {}
        if sel.repair != "none":
            fit = fit_repair(handle, torch_model, resolved.resolved.remove, sel, cal)
            resolved, _ = with_repair(resolved, fit, file=None)
            maps = fit.maps
    return resolved, result, maps


def _calibration_batches(handle: ModelHandle, cal: _recipe.CalibrationSpec,
                         limit: int | None = None) -> tuple[Any, Any]:
    """The calibration set of ``cal`` for this model (its first ``limit`` sequences), and a
    maker of its batches."""
    from .analyze import calibration
    from .repair.fit import calibration_batches

    tokenizer = handle.family.load_tokenizer(handle.path)
    calib = calibration.build(tokenizer, cal.source, field=cal.field, num_samples=cal.num_samples,
                              max_length=cal.max_length, seed=cal.seed)
    if limit is not None:
        calib = calibration.CalibrationSet(calib.source, calib.sequences[:limit], calib.max_length)
    return calib, calibration_batches(calib.sequences, cal.batch_size, pad_id(tokenizer))


def _objective(handle: ModelHandle, sel: _recipe.SelectionSpec, seed: int) -> Any:
    from .analyze.objective import Objective

    fam = handle.family
    mask_id = fam.mask_token_id(handle.ckpt.config) if fam.generative_kind == "diffusion" else None
    return Objective(fam, sel.objective, mask_id, seed=seed)


def loss_search(handle: ModelHandle, torch_model: Any, sel: _recipe.SelectionSpec, cal: _recipe.CalibrationSpec,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Loss-aware selection (repskip.analyze.search) on the calibration text: the record
    that ``analysis.json`` keeps under ``search`` and the selection reads."""
    from .analyze.search import search
    from .analyze.selection import protected_layers
    from .repair.fit import calibration_batches

    if sel.repair != "none":
        from .repair.fit import check_supported

        check_supported(handle.family, handle.ckpt.config)
    calib, _ = _calibration_batches(handle, cal)
    scored, rest = calib.sequences[: sel.search_samples], calib.sequences[sel.search_samples :]
    pad = pad_id(handle.family.load_tokenizer(handle.path))
    batches = calibration_batches(scored, cal.batch_size, pad)
    # a candidate's map is fitted on the calibration sequences its loss is not measured on
    fit_batches = calibration_batches(rest, cal.batch_size, pad) if rest else None
    # a chosen candidate's map is checked on the text fit_repair will check the final maps on
    check_batches = calibration_batches(calib.sequences, cal.batch_size, pad)
    protected = protected_layers(handle.num_layers, sel.protect_first, sel.protect_last, sel.protect)
    result = search(torch_model, handle.family, batches, _objective(handle, sel, cal.seed), strategy=sel.strategy,
                    k=sel.k, protected=protected, allow_adjacent=True if sel.allow_adjacent is None else sel.allow_adjacent,
                    repair=sel.repair != "none", ridge=sel.ridge, fit_batches=fit_batches,
                    check_batches=check_batches, progress=progress)
    return {**result.to_dict(), "calibration_hash": calib.hash, "sequences": len(scored),
            "fit_sequences": len(rest) if sel.repair != "none" and rest else (len(scored) if sel.repair != "none" else 0),
            **search_request(handle, sel)}


def auto_search(handle: ModelHandle, torch_model: Any, analysis: _analysis.Analysis, sel: _recipe.SelectionSpec,
                cal: _recipe.CalibrationSpec, progress: Callable[[int, int], None] | None = None) -> dict:
    """``--strategy auto`` (repskip.analyze.auto): the similarity strategies' proposals at k,
    each repaired as the recipe asks and scored on the calibration text as a loss search
    scores its trials; the record ``analysis.json`` keeps under ``auto``."""
    from .analyze import auto
    from .repair.fit import calibration_batches

    repair = sel.repair != "none"
    if repair:
        from .repair.fit import check_supported

        check_supported(handle.family, handle.ckpt.config)
    proposals, declined = auto.candidates(analysis, sel.k, threshold=sel.threshold, allow_adjacent=sel.allow_adjacent,
                                          protect_first=sel.protect_first, protect_last=sel.protect_last,
                                          protect=sel.protect, repair=repair)
    calib, _ = _calibration_batches(handle, cal)
    scored, rest = calib.sequences[: sel.search_samples], calib.sequences[sel.search_samples :]
    pad = pad_id(handle.family.load_tokenizer(handle.path))
    # as in the loss search: the maps are fitted on the sequences the scores are not taken on
    result = auto.choose(torch_model, handle.family, proposals, batches=calibration_batches(scored, cal.batch_size, pad),
                         fit_batches=calibration_batches(rest, cal.batch_size, pad) if rest else None,
                         objective=_objective(handle, sel, cal.seed), repair=repair, ridge=sel.ridge,
                         progress=progress, method=sel.repair)
    return {**result, "declined": declined, **auto_request(handle, sel, calib.hash)}


def auto_request(handle: ModelHandle, sel: _recipe.SelectionSpec, calibration_hash: str) -> dict:
    """What an ``auto`` record's choice depends on beyond the analysis (recorded with it, so
    that a later ``analyze`` or ``select`` can tell whether it answers its own request)."""
    return {"k": sel.k, "threshold": sel.threshold, "objective": sel.objective, "repair": sel.repair != "none",
            "method": sel.repair,
            "sequences": sel.search_samples, "calibration_hash": calibration_hash,
            "protected": search_request(handle, sel)["protected"], "ridge": sel.ridge if sel.repair != "none" else None,
            "allow_adjacent": sel.allow_adjacent}  # None: each proposer's own rule


def search_request(handle: ModelHandle, sel: _recipe.SelectionSpec) -> dict:
    """What a loss search's result depends on beyond the calibration text (recorded with it,
    so that a later ``analyze`` can tell whether the record answers its own search)."""
    from .analyze.selection import protected_layers

    return {"protected": sorted(protected_layers(handle.num_layers, sel.protect_first, sel.protect_last, sel.protect)),
            "allow_adjacent": True if sel.allow_adjacent is None else sel.allow_adjacent,
            "ridge": sel.ridge if sel.repair != "none" else None,
            # a repaired search scores its choices with the map the final fit's check keeps
            # (searches recorded before that have no such key and are not reused)
            "checked_choices": sel.repair != "none"}


# Fewer calibration tokens than this many per hidden unit leave a linear repair map
# (hidden x hidden parameters) loose enough to fit the calibration text instead of the model:
# on SmolLM2-135M (hidden 576), maps fitted on about 500 WikiText-2 tokens made perplexity
# worse than no repair, maps fitted on 8k tokens made it much better (docs/benchmarks.md).
# A warning threshold, not a rule.
TOKENS_PER_HIDDEN = 8


def fit_repair(handle: ModelHandle, torch_model: Any, removed: Sequence[int], sel: _recipe.SelectionSpec,
               cal: _recipe.CalibrationSpec, progress: Callable[[int, int], None] | None = None) -> Any:
    """The linear repair of ``removed`` on the calibration text (repskip.repair.fit)."""
    from .repair.fit import check_supported
    from .repair.sweep import fit_linear_layerwise

    check_supported(handle.family, handle.ckpt.config)
    _, batches = _calibration_batches(handle, cal)
    fit = fit_linear_layerwise(torch_model, handle.family, batches, _objective(handle, sel, cal.seed), removed,
                               handle.num_layers, sel.ridge, progress, method=sel.repair)
    hidden = handle.family.hidden_size(handle.ckpt.config)
    if fit.tokens < TOKENS_PER_HIDDEN * hidden:
        warnings.warn(f"the linear repair was fitted on {fit.tokens} calibration tokens, few for maps of "
                      f"{hidden} x {hidden}: below about {TOKENS_PER_HIDDEN * hidden} tokens a map can fit the "
                      "calibration text rather than the model and raise the loss; give more text (--calib, "
                      "--num-samples, --max-length) and check the result with repskip verify", stacklevel=2)
    for run in fit.dropped:
        detail = next(d for d in fit.details if d["anchor"] == run.anchor)
        tried = ", ".join(f"{k} {v:.3f}" for k, v in detail["check_loss"].items())
        warnings.warn(f"no linear map for removed layers {run.first}..{run.last} brought the predictions closer "
                      f"to the full model's (KL on calibration text: {tried}); that run is left unrepaired",
                      stacklevel=2)
    return fit


def with_repair(recipe: _recipe.Recipe, fit: Any, file: str | None) -> tuple[_recipe.Recipe, bytes | None]:
    """The resolved recipe recording ``fit`` (its maps in ``file``, beside the recipe, or in
    no file), and the bytes of that file; the recipe as it was and None when the fit kept no
    map (every run's map raised the calibration loss)."""
    from .repair import store

    if not fit.maps:
        return recipe, None
    raw, digest = store.serialize(fit.maps, fit.method)
    ref = _recipe.RepairRef(method=fit.method, file=file, sha256=digest, ridge=fit.ridge, tokens=fit.tokens, maps=[
        _recipe.RepairMap(layer=run.anchor, run=[run.first, run.last], residual=round(fit.residual[run.anchor], 6))
        for run in fit.runs if run.anchor in fit.maps])
    assert recipe.resolved is not None
    return recipe.model_copy(update={"resolved": recipe.resolved.model_copy(update={"repair": ref})}), raw


def check_compress(recipe: _recipe.Recipe, output: Path, *, force: bool = False, format: str = "safetensors",
                   opset: int = 18, export_dtype: str = "fp32", provider: str = "cpu",
                   handle: ModelHandle | None = None, quantize: str = "none") -> None:
    """Every refusal resolving and compressing ``recipe`` can make from the arguments alone,
    made before a long analysis or export starts, not after it."""
    check_options(output, force=force, format=format, opset=opset, export_dtype=export_dtype, provider=provider,
                  handle=handle, quantize=quantize)
    if handle is not None:
        check_recipe_fits(recipe, handle)
    check_calibration(recipe)


def flops(
    model: str | Path | ModelHandle, removed: Sequence[int], seq_len: int = 512
) -> FlopsComparison:
    """Analytic FLOPs of ``model`` with and without the ``removed`` layers."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    validate_kept(handle.num_layers, removed)
    return compare(handle.family.cost(handle.ckpt.config), list(removed), seq_len)


def check_repair_method(strategy: str, repair: str) -> None:
    """Refuse the cosine repair with a loss strategy: the search fits a map for every trial,
    which least squares does from its sums at once, and the cosine fit by an iterative solve
    over kept rows (memory and time per trial)."""
    from .analyze.selection import LOSS_STRATEGIES

    if repair == "cosine" and strategy in LOSS_STRATEGIES:
        raise RepskipError(f"--repair cosine is not available with --strategy {strategy}, whose search fits a map "
                           "for every trial: use --repair linear with it, or --strategy auto (or a similarity "
                           "strategy) with --repair cosine")


def check_recipe_fits(recipe: _recipe.Recipe, handle: ModelHandle) -> None:
    """Refuse, before any analysis or write, a recipe that cannot apply to this model: made
    for another kind or another model, naming layers it does not have, or asking for more
    layers than an analysis could choose."""
    check_kind(recipe, handle)
    if recipe.is_resolved:
        assert recipe.resolved is not None
        _recipe.check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
        validate_kept(handle.num_layers, recipe.resolved.remove)
        return
    from .analyze.selection import check_feasible

    sel = recipe.selection
    assert sel is not None
    check_repair_method(sel.strategy, sel.repair)
    check_feasible(handle.num_layers, sel.strategy, sel.k, allow_adjacent=sel.allow_adjacent,
                   protect_first=sel.protect_first, protect_last=sel.protect_last, protect=sel.protect)


def check_removable(handle: ModelHandle, removed: Sequence[int]) -> None:
    """Refuse a removal the family cannot write a config for (a kept layer would change, or no
    config field can describe the kept layers), before any fit or write."""
    kept = validate_kept(handle.num_layers, removed)
    handle.family.rewrite_config(handle.ckpt.config, kept)
