"""The library calls behind each CLI command: analyze, resolve, compress, flops, generate.

Each takes a model argument (a local folder or a Hugging Face Hub id) and returns plain
results; nothing here prints.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import recipe as _recipe
from .checkpoint import Checkpoint, open_checkpoint, read_config, resolve_model
from .compress.files import DEFAULT_SHARD_SIZE, write_pruned
from .outputs import check_output
from .errors import RepskipError
from .family import Family, find_family, validate_kept
from .flops import FlopsComparison, compare
from .analyze.selection import LOSS_STRATEGIES

if TYPE_CHECKING:  # the analysis needs torch; opening a model does not
    from .analyze import analysis as _analysis

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
        from .runtime import load_onnx_model

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
    from .consistency import check_checkpoint
    from .formats import ONNX_FILE, is_onnx_folder

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


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


MODES = ("forward", "masked", "sampling")
FORMATS = ("safetensors", "onnx")


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
    matrix_tokens: int | None = 2048,
    mode: str | None = None,
    mask_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    prompt_fraction: float = 0.5,
    sampler_settings: dict | None = None,
    chat: bool = True,
    dtype: str | None = None,
    device: str = "cpu",
    family: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    torch_model: Any = None,
) -> _analysis.Analysis:
    """Measure every layer of ``model`` on calibration text (see repskip.analyze.analysis).

    ``mode``: ``forward`` runs the text as it is (the default for autoregressive models);
    ``masked`` (the default for diffusion models) masks a fraction of each sequence's
    response for every ratio of ``mask_ratios``; ``sampling`` runs the family's sampler on
    the calibration texts as prompts and measures every denoising step.
    """
    from .analyze import analysis as _analysis
    from .analyze import calibration

    handle = model if isinstance(model, ModelHandle) else open_model(model, family)
    fam = handle.family
    diffusion = fam.generative_kind == "diffusion"
    mode = mode or ("masked" if diffusion else "forward")
    if mode not in MODES:
        raise RepskipError(f"unknown analysis mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "forward" and not diffusion:
        raise RepskipError(
            f"analysis mode {mode!r} needs a diffusion model; {handle.path.name} is autoregressive "
            f"({handle.family_name}): use --mode forward"
        )
    bad_ratio = [r for r in mask_ratios if not 0 < r <= 1]
    if mode == "masked" and (bad_ratio or not mask_ratios):
        raise RepskipError(f"mask ratios must lie in (0, 1], got {list(mask_ratios)}")
    mask_id = fam.mask_token_id(handle.ckpt.config) if diffusion else None
    device = parse_device(device)
    if torch_model is None:
        torch_model = fam.load(handle.path, parse_dtype(dtype), device)
    tokenizer = fam.load_tokenizer(handle.path)
    settings = {
        "mode": mode,
        "num_samples": num_samples,
        "calib_field": calib_field,
        "positions": positions,
        "batch_size": batch_size,
        "seed": seed,
        "max_distance": max_distance,
        "matrix_tokens": matrix_tokens,
        "dtype": str(next(torch_model.parameters()).dtype).replace("torch.", ""),
        "device": device,
    }
    layerwise = bool(getattr(torch_model, "repskip_layerwise", False))
    if layerwise and mode == "sampling":
        raise RepskipError("analysis mode 'sampling' runs the sampler on a model in memory; use --offload none "
                           "(or --mode masked, which runs one layer at a time)")
    if mode == "sampling":
        return _analyze_sampling(handle, torch_model, tokenizer, calib, calib_field, num_samples, max_length,
                                 batch_size, seed, max_distance, sampler_settings or {}, chat, settings, progress)
    calib_set = calibration.build(
        tokenizer, calib, field=calib_field, num_samples=num_samples, max_length=max_length, seed=seed
    )
    kwargs: dict[str, Any] = {}
    primary = "tokens"
    if mode == "masked":
        names, prepares = _analysis.masked_sweep(mask_id, mask_ratios, prompt_fraction, seed)
        kwargs = dict(groups=names, prepares=prepares, matrix_groups=["masked", "prompt"])
        primary = "masked"
        settings.update(mask_ratios=list(mask_ratios), prompt_fraction=prompt_fraction, mask_token_id=mask_id)
    acc = _analysis.collect(
        torch_model, fam, calib_set, pad_id=_pad_id(tokenizer), batch_size=batch_size, positions=positions,
        max_distance=max_distance, matrix_tokens=matrix_tokens, progress=progress, layerwise=layerwise, **kwargs,
    )
    return _analysis.build_result(acc, model_info=handle.info(), calib=calib_set, settings=settings, primary=primary)


def _analyze_sampling(handle, torch_model, tokenizer, calib, calib_field, num_samples, max_length, batch_size,
                      seed, max_distance, sampler_settings, chat, settings, progress) -> _analysis.Analysis:
    """Statistics along real denoising trajectories of the family's sampler."""
    import torch

    from .analyze import analysis as _analysis
    from .analyze import calibration
    from .sampler import format_prompt, get_sampler
    from .textio import tokenize_prefix

    fam = handle.family
    name = fam.default_sampler
    sampler = get_sampler(name)
    cfg = sampler.settings(sampler_settings)
    steps = int(cfg["steps"])
    gen_length = int(cfg.get("gen_length") or cfg.get("max_new_tokens"))
    block_length = int(cfg.get("block_length") or gen_length)
    steps_per_block = max(1, steps // max(1, gen_length // block_length))
    mask_id = fam.mask_token_id(handle.ckpt.config)
    texts, label = calibration.pick_texts(calib, field=calib_field, num_samples=num_samples, seed=seed,
                                          max_chars=calibration.char_cap(max_length))
    prompts = []
    for text in texts:  # keep each prompt within max_length tokens, tokenising a bounded prefix only
        ids = tokenize_prefix(tokenizer, text, max_length, add_special_tokens=False)
        prompts.append(format_prompt(tokenizer, tokenizer.decode(ids), chat))
    calib_set = calibration.CalibrationSet(
        label, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], max_length
    )
    blocks = gen_length // block_length
    names = ["current_block", "masked", "prompt", "generated",
             *(f"masked@block{b}" for b in range(blocks)), *(f"masked@step{i}" for i in range(steps))]
    L = len(fam.decoder_layers(torch_model))
    device = next(torch_model.parameters()).device
    acc = _analysis.LayerStatsAccumulator(L, names, max_distance=max_distance, device=device,
                                          matrix_groups=["current_block", "masked", "prompt"],
                                          matrix_tokens=settings["matrix_tokens"])

    rows = [0]  # prompts in the current call: classifier-free guidance appends as many unconditional rows

    def masks_for(ids: torch.Tensor, valid: torch.Tensor, call: int) -> dict[str, torch.Tensor]:
        valid = valid.clone()
        valid[rows[0]:] = False  # measure the conditional rows only
        step = call % steps
        block = min(step // steps_per_block, blocks - 1)
        P = ids.shape[1] - gen_length
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
        masked = (ids == mask_id) & valid
        in_block = (pos >= P + block * block_length) & (pos < P + (block + 1) * block_length)
        none = torch.zeros_like(masked)
        out = {"current_block": masked & in_block, "masked": masked, "prompt": valid & (pos < P),
               "generated": valid & (pos >= P) & ~masked}
        out.update({f"masked@block{b}": masked if b == block else none for b in range(blocks)})
        out.update({f"masked@step{i}": masked if i == step else none for i in range(steps)})
        return out

    done = 0
    with _analysis.observe_forwards(torch_model, fam, acc, masks_for):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rows[0] = len(chunk)
            sampler.generate(torch_model, tokenizer, chunk, family=fam, seed=seed + start, **cfg)
            done += len(chunk)
            if progress:
                progress(done, len(prompts))
    settings.update(sampler={"name": name, **cfg}, chat=chat, mask_token_id=mask_id)
    return _analysis.build_result(acc, model_info=handle.info(), calib=calib_set, settings=settings,
                                  primary="current_block")


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


def resolve_recipe(
    recipe: _recipe.Recipe,
    model: str | Path | ModelHandle,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[_recipe.Recipe, _analysis.Analysis | None, dict]:
    """The recipe with its layers chosen for ``model`` (running the analysis, the loss search
    and the repair fit as the recipe asks), the analysis if one ran, and the repair maps
    (anchor layer -> T; from the recipe's file for a resolved recipe, {} without repair)."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    check_kind(recipe, handle)
    if recipe.is_resolved:
        _recipe.check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
        return recipe, None, recipe.repair_maps(handle.family.hidden_size(handle.ckpt.config))
    check_calibration(recipe)
    sel = recipe.selection
    assert sel is not None
    cal = recipe.calibration
    torch_model = handle.load(dtype, device)
    result = analyze(
        handle,
        calib=cal.source,
        calib_field=cal.field,
        num_samples=cal.num_samples,
        max_length=cal.max_length,
        batch_size=cal.batch_size,
        seed=cal.seed,
        positions=sel.positions,
        mode=sel.mode,
        mask_ratios=sel.mask_ratios,
        prompt_fraction=sel.prompt_fraction,
        sampler_settings=sel.sampler,
        chat=sel.chat,
        dtype=dtype,
        device=device,
        progress=progress,
        torch_model=torch_model,
    )
    if sel.strategy in LOSS_STRATEGIES:
        result.data["search"] = loss_search(handle, torch_model, sel, cal)
    resolved = _recipe.resolve(recipe, result)
    maps: dict = {}
    if sel.repair == "linear":
        assert resolved.resolved is not None
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
    return calib, calibration_batches(calib.sequences, cal.batch_size, _pad_id(tokenizer))


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

    if sel.repair == "linear":
        from .repair.fit import check_supported

        check_supported(handle.family, handle.ckpt.config)
    if getattr(torch_model, "repskip_layerwise", False):
        raise RepskipError(f"the {sel.strategy} strategy's search runs on a model in memory and this one is run one "
                           "layer at a time from disk; use a similarity strategy (block-influence, angular-block, "
                           "paper) or --offload none")
    calib, _ = _calibration_batches(handle, cal)
    scored, rest = calib.sequences[: sel.search_samples], calib.sequences[sel.search_samples :]
    pad = _pad_id(handle.family.load_tokenizer(handle.path))
    batches = calibration_batches(scored, cal.batch_size, pad)
    # a candidate's map is fitted on the calibration sequences its loss is not measured on
    fit_batches = calibration_batches(rest, cal.batch_size, pad) if rest else None
    # a chosen candidate's map is checked on the text fit_repair will check the final maps on
    check_batches = calibration_batches(calib.sequences, cal.batch_size, pad)
    protected = protected_layers(handle.num_layers, sel.protect_first, sel.protect_last, sel.protect)
    result = search(torch_model, handle.family, batches, _objective(handle, sel, cal.seed), strategy=sel.strategy,
                    k=sel.k, protected=protected, allow_adjacent=True if sel.allow_adjacent is None else sel.allow_adjacent,
                    repair=sel.repair == "linear", ridge=sel.ridge, fit_batches=fit_batches,
                    check_batches=check_batches, progress=progress)
    return {**result.to_dict(), "calibration_hash": calib.hash, "sequences": len(scored),
            "fit_sequences": len(rest) if sel.repair == "linear" and rest else (len(scored) if sel.repair == "linear" else 0),
            **search_request(handle, sel)}


def search_request(handle: ModelHandle, sel: _recipe.SelectionSpec) -> dict:
    """What a loss search's result depends on beyond the calibration text (recorded with it,
    so that a later ``analyze`` can tell whether the record answers its own search)."""
    from .analyze.selection import protected_layers

    return {"protected": sorted(protected_layers(handle.num_layers, sel.protect_first, sel.protect_last, sel.protect)),
            "allow_adjacent": True if sel.allow_adjacent is None else sel.allow_adjacent,
            "ridge": sel.ridge if sel.repair == "linear" else None,
            # a repaired search scores its choices with the map the final fit's check keeps
            # (searches recorded before that have no such key and are not reused)
            "checked_choices": sel.repair == "linear"}


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
                     handle.num_layers, sel.ridge, progress)
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
    raw, digest = store.serialize(fit.maps)
    ref = _recipe.RepairRef(file=file, sha256=digest, ridge=fit.ridge, tokens=fit.tokens, maps=[
        _recipe.RepairMap(layer=run.anchor, run=[run.first, run.last], residual=round(fit.residual[run.anchor], 6))
        for run in fit.runs if run.anchor in fit.maps])
    assert recipe.resolved is not None
    return recipe.model_copy(update={"resolved": recipe.resolved.model_copy(update={"repair": ref})}), raw


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


def check_compress(recipe: _recipe.Recipe, output: Path, *, force: bool = False, format: str = "safetensors",
                   opset: int = 18, export_dtype: str = "fp32", provider: str = "cpu",
                   handle: ModelHandle | None = None) -> None:
    """Every refusal ``compress`` can make from its arguments alone, made before a long
    analysis or export starts, not after it."""
    if format not in FORMATS:
        raise RepskipError(f"unknown output format {format!r}; choose {' or '.join(FORMATS)}")
    check_output(output, force, [handle.path] if handle else [])
    if handle is not None:
        check_recipe_fits(recipe, handle)
    check_calibration(recipe)
    if format == "onnx":
        from .compress.onnx_export import check_options

        check_options(opset, export_dtype, provider)


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
    format: str = "safetensors",
    opset: int = 18,
    export_dtype: str = "fp32",
    provider: str = "cpu",
    parity_tolerance: float | None = None,
    status: Callable[[str], None] | None = None,
) -> tuple[Any, _recipe.Recipe]:
    """Write ``model`` without the recipe's layers to ``output``: a safetensors checkpoint
    (a CompressResult) or, with ``format="onnx"``, an ONNX graph checked against PyTorch on
    ``provider`` (an OnnxExportResult; see repskip.compress.onnx_export)."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    handle.require_weights("compress")
    if not isinstance(recipe, _recipe.Recipe):
        recipe = _recipe.load(recipe)
    output = Path(output)
    check_compress(recipe, output, force=force, format=format, opset=opset, export_dtype=export_dtype,
                   provider=provider, handle=handle)
    resolved, _, maps = resolve_recipe(recipe, handle, dtype=dtype, device=device, progress=progress)
    assert resolved.resolved is not None
    kept = validate_kept(handle.num_layers, resolved.resolved.remove)
    stamp: dict[str, Any] = {}
    if not resolved.resolved.versions:  # a hand-written recipe: record what exported it
        from .versions import versions

        stamp["versions"] = versions()
    if resolved.resolved.model is None:  # and what it was cut from, so verify can tell
        stamp["model"] = _recipe.ModelRef(fingerprint=handle.ckpt.fingerprint(), family=handle.family_name,
                                          model_type=handle.ckpt.config.get("model_type"), name_or_path=str(handle.path))
    if resolved.resolved.repair is not None:  # the export keeps the record; its maps are folded in
        stamp["repair"] = resolved.resolved.repair.model_copy(update={"file": None})
    if stamp:
        resolved = resolved.model_copy(update={"resolved": resolved.resolved.model_copy(update=stamp)})
    new_config = handle.family.rewrite_config(handle.ckpt.config, kept)
    if format == "onnx":
        from .compress.onnx_export import export_onnx

        onnx_result = export_onnx(handle, kept, new_config, resolved.to_yaml(), output, opset=opset,
                                  dtype=export_dtype, provider=provider, tolerance=parity_tolerance, force=force,
                                  status=status, maps=maps)
        return onnx_result, resolved
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
        folds=repair_folds(handle, maps),
    )
    return result, resolved


def export_as_is(
    model: str | Path | ModelHandle,
    output: str | Path,
    *,
    force: bool = False,
    opset: int = 18,
    export_dtype: str = "fp32",
    provider: str = "cpu",
    parity_tolerance: float | None = None,
    status: Callable[[str], None] | None = None,
) -> Any:
    """Export ``model`` to ONNX keeping every layer (a model compressed or healed before);
    the recipe it carries, if any, goes with it."""
    from .compress.onnx_export import check_options, export_onnx

    handle = model if isinstance(model, ModelHandle) else open_model(model)
    handle.require_weights("compress")
    check_options(opset, export_dtype, provider)
    check_output(Path(output), force, [handle.path])
    return export_onnx(handle, list(range(handle.num_layers)), handle.ckpt.config, None, Path(output), opset=opset,
                       dtype=export_dtype, provider=provider, tolerance=parity_tolerance, force=force, status=status)


def flops(
    model: str | Path | ModelHandle, removed: Sequence[int], seq_len: int = 512
) -> FlopsComparison:
    """Analytic FLOPs of ``model`` with and without the ``removed`` layers."""
    handle = model if isinstance(model, ModelHandle) else open_model(model)
    validate_kept(handle.num_layers, removed)
    return compare(handle.family.cost(handle.ckpt.config), list(removed), seq_len)


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
    check_feasible(handle.num_layers, sel.strategy, sel.k, allow_adjacent=sel.allow_adjacent,
                   protect_first=sel.protect_first, protect_last=sel.protect_last, protect=sel.protect)


def check_removable(handle: ModelHandle, removed: Sequence[int]) -> None:
    """Refuse a removal the family cannot write a config for (a kept layer would change, or no
    config field can describe the kept layers), before any fit or write."""
    kept = validate_kept(handle.num_layers, removed)
    handle.family.rewrite_config(handle.ckpt.config, kept)


def check_kind(recipe: _recipe.Recipe, handle: ModelHandle) -> None:
    """Refuse a recipe whose applies_to rule excludes this model's kind."""
    kind = handle.family.generative_kind
    wanted = recipe.selection.applies_to if recipe.selection else "any"
    if wanted not in ("any", kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise RepskipError(
            f"the recipe applies to {wanted} models only; {handle.path.name} is {article} {kind} model "
            f"({handle.family_name})"
        )


def removed_layers(recipe: _recipe.Recipe, handle: ModelHandle) -> list[int]:
    """The layers a resolved recipe removes, checked against the model."""
    check_kind(recipe, handle)
    if not recipe.is_resolved:
        raise RepskipError(
            "this recipe is unresolved (it says how to choose, not which layers): run "
            "'repskip analyze' or 'repskip compress' first, or pass a resolved recipe"
        )
    _recipe.check_applies(recipe, handle.ckpt.fingerprint(), handle.num_layers)
    assert recipe.resolved is not None
    return list(recipe.resolved.remove)
