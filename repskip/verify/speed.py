"""What a user means by "faster": latency of one forward step and generated tokens per second,
the base and the compressed model timed alternately on the same inputs.

- Autoregressive: a prefill of the prompt, then ``new_tokens`` cached decode steps of one token
  (greedy, never stopping early, so every run does the same work). Reported apart: prefill
  latency, decode latency per token, and tokens per second over the whole generation.
- Diffusion: one denoising step is one forward pass over the prompt plus the generation
  canvas; a generation is ``steps`` of them, so tokens per second is
  ``gen_length / (steps x step latency)``.

Each repeat times both models back to back, the order alternating from one repeat to the next,
after one untimed warm-up each: slow drifts of the machine (another job, a clock change) hit both
alike. The ratio base / compressed is taken per repeat; its median and its range over the
repeats are reported, beside the ideal the FLOPs give.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..flops import ModelCost, forward_flops, generation_flops
from ..runtime import model_device, output_cache

REPEATS = 5
NEW_TOKENS = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _autoregressive(model: Any, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Seconds of the prefill and of each decode step (the model called as the ``ar`` sampler
    calls it: ``model(input_ids, attention_mask, position_ids, past)``)."""
    device = model_device(model)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=device)[None]
    _sync(device)
    start = time.perf_counter()
    out = model(ids, mask, positions, None)
    token = out.logits[:, -1].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        start = time.perf_counter()
        out = model(token[:, None], mask, positions, output_cache(out))
        token = out.logits[:, -1].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - start)
    return {"prefill_s": prefill, "decode_s": statistics.median(steps) if steps else 0.0,
            "total_s": prefill + sum(steps)}


@torch.inference_mode()
def _diffusion(model: Any, family: Any, ids: torch.Tensor, gen_length: int, mask_id: int) -> dict[str, float]:
    """Seconds of one denoising step over prompt + a fully masked canvas (logits for the
    canvas only, as the samplers compute them)."""
    device = model_device(model)
    canvas = torch.cat([ids, torch.full((1, gen_length), mask_id, dtype=ids.dtype)], dim=1).to(device)
    mask = torch.ones_like(canvas)
    _sync(device)
    start = time.perf_counter()
    family.token_logits(model, canvas, mask, (ids.shape[1], canvas.shape[1]))
    _sync(device)
    return {"step_s": time.perf_counter() - start}


def _ratio(base: list[float], comp: list[float]) -> dict:
    ratios = [b / c for b, c in zip(base, comp) if c > 0]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)} if ratios else {}


def measure(base: Any, comp: Any, ids: torch.Tensor, *, kind: str, costs: tuple[ModelCost, ModelCost],
            new_tokens: int = NEW_TOKENS, steps: int | None = None, mask_id: int | None = None,
            repeats: int = REPEATS, progress: Callable[[int, int], None] | None = None) -> dict:
    """Time ``base`` and ``comp`` (Sides) on the prompt ``ids`` [1, P]; ``costs``: what each
    computes (its layers only), for the FLOPs-ideal ratio. Diffusion: ``new_tokens`` is the
    canvas length and ``steps`` the denoising steps per generation."""
    prompt = ids.shape[1]
    if kind == "autoregressive":
        run = lambda side: _autoregressive(side.model, ids, new_tokens)  # noqa: E731
        keys = ("prefill_s", "decode_s", "total_s")
    else:
        run = lambda side: _diffusion(side.model, side.handle.family, ids, new_tokens, mask_id)  # noqa: E731
        keys = ("step_s",)
    for side in (base, comp):  # warm-up: first calls allocate, compile kernels, fill caches
        run(side)
    times: dict[str, dict[str, list[float]]] = {"base": {k: [] for k in keys}, "compressed": {k: [] for k in keys}}
    for r in range(repeats):
        order = (("base", base), ("compressed", comp)) if r % 2 == 0 else (("compressed", comp), ("base", base))
        for label, side in order:
            for k, v in run(side).items():
                times[label][k].append(v)
        if progress:
            progress(r + 1, repeats)
    out: dict[str, Any] = {"method": "alternating repeats, median; see repskip.verify.speed", "repeats": repeats,
                           "prompt_tokens": prompt, "batch": 1}
    if kind == "autoregressive":
        out["new_tokens"] = new_tokens
        for label in ("base", "compressed"):
            t = times[label]
            out[label] = {"prefill_ms": 1e3 * statistics.median(t["prefill_s"]),
                          "decode_ms_per_token": 1e3 * statistics.median(t["decode_s"]),
                          "tokens_per_s": new_tokens / statistics.median(t["total_s"])}
        out["speedup"] = {name: _ratio(times["base"][k], times["compressed"][k])
                          for name, k in (("prefill", "prefill_s"), ("decode", "decode_s"), ("generation", "total_s"))}
        full = generation_flops(costs[0], kind, prompt, new_tokens).total
        cut = generation_flops(costs[1], kind, prompt, new_tokens).total
        decode_full = forward_flops(costs[0], 1, context=prompt + new_tokens // 2).total
        decode_cut = forward_flops(costs[1], 1, context=prompt + new_tokens // 2).total
        out["flops_ideal"] = {"generation": full / cut, "decode": decode_full / decode_cut}
    else:
        steps = steps or new_tokens
        out.update(gen_length=new_tokens, steps=steps)
        for label in ("base", "compressed"):
            step = statistics.median(times[label]["step_s"])
            out[label] = {"step_ms": 1e3 * step, "tokens_per_s": new_tokens / (steps * step)}
        out["speedup"] = {"step": _ratio(times["base"]["step_s"], times["compressed"]["step_s"])}
        full = forward_flops(costs[0], prompt + new_tokens, logits_tokens=new_tokens).total
        cut = forward_flops(costs[1], prompt + new_tokens, logits_tokens=new_tokens).total
        out["flops_ideal"] = {"step": full / cut}
    return out
