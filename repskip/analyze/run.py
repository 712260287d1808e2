"""The analysis stage: run a model over calibration text and measure every decoder layer
(repskip.analyze.analysis), in the mode its kind calls for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.model import ModelHandle, open_model, pad_id, parse_device, parse_dtype
from ..errors import RepskipError

if TYPE_CHECKING:
    from . import analysis as _analysis

MODES = ("forward", "masked", "sampling")


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
    from . import analysis as _analysis
    from . import calibration

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
        torch_model, fam, calib_set, pad_id=pad_id(tokenizer), batch_size=batch_size, positions=positions,
        max_distance=max_distance, matrix_tokens=matrix_tokens, progress=progress, layerwise=layerwise, **kwargs,
    )
    return _analysis.build_result(acc, model_info=handle.info(), calib=calib_set, settings=settings, primary=primary)


def _analyze_sampling(handle, torch_model, tokenizer, calib, calib_field, num_samples, max_length, batch_size,
                      seed, max_distance, sampler_settings, chat, settings, progress) -> _analysis.Analysis:
    """Statistics along real denoising trajectories of the family's sampler."""
    import torch

    from . import analysis as _analysis
    from . import calibration
    from ..sampler import format_prompt, get_sampler
    from ..textio import tokenize_prefix

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
