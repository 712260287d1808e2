"""Running one benchmark on one model: its sampler settings, then its items in fixed batches
(batch k always holds the same items and uses seed + k), each batch appended to the model's
cache before the next starts."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from ..benchmark import Benchmark, Item
from ..errors import RepskipError
from ..runtime import model_device
from ..sampler import get_sampler
from ..textio import tokenize_prefix
from .cache import ItemCache
from .sides import Side

PRESETS = Path(__file__).resolve().parents[2] / "recipes" / "presets" / "sampling.yaml"
LENGTH_KEYS = {"ar": "max_new_tokens", "dream": "max_new_tokens", "llada": "gen_length"}
MC_SAMPLES = 32  # Monte Carlo draws per choice of a multiple-choice benchmark on a diffusion model


def load_presets(path: Path | None = None) -> dict:
    path = Path(path) if path else PRESETS
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RepskipError(f"sampling presets {path} are not a YAML mapping")
    return data


def sampler_settings(sampler: str, bench_name: str, bench: Benchmark, presets: dict, overrides: dict,
                     budget: int | None = None) -> dict:
    """Preset for (sampler, benchmark), else the sampler's preset default, the benchmark's
    token budget for the length (``budget``: the one for the prompt that runs), then the
    user's overrides."""
    table = presets.get(sampler) or {}
    settings = dict(table.get("default") or {})
    length_key = LENGTH_KEYS.get(sampler)
    if length_key and length_key not in (table.get(bench_name) or {}) and length_key not in settings:
        settings[length_key] = budget or bench.max_new_tokens
    settings.update(table.get(bench_name) or {})
    settings.update(overrides)
    return settings


def run_benchmark(name: str, bench: Benchmark, items: list[Item], sides: tuple[Side, Side], *, out_dir: Path,
                  table: dict, sampler_name: str, overrides: dict, chat: bool, seed: int, batch_size: int,
                  max_length: int, rank: int, world: int,
                  progress: Callable[[str, int, int], None] | None) -> tuple[dict, dict[str, ItemCache]]:
    """Run (or resume) one benchmark on both models: its sampler settings and both caches."""
    settings = {}
    if bench.kind == "generation":
        budget = bench.generation_budget(sides[0].tokenizer, chat)
        settings = sampler_settings(sampler_name, name, bench, table, overrides, budget)
    if bench.kind == "multiple_choice":  # how the log-likelihoods are computed, for the report
        diffusion = sides[0].handle.family.generative_kind == "diffusion"
        settings = ({"loglikelihood": "masked Monte Carlo estimate", "mc_samples": mc_samples(bench)} if diffusion
                    else {"loglikelihood": "exact next-token"})
    run_key = _settings_key({"settings": settings, "chat": chat and bench.kind != "multiple_choice",  # MC: no template
                             "seed": seed, "batch": batch_size, "max_length": max_length, "options": bench.options})
    caches = {}
    for side in sides:
        cache = caches[side.label] = ItemCache(out_dir / "cache" / side.tag, f"{name}-{run_key}", rank, world)
        done = [sum(1 for it in items if it.id in cache)]

        def tick(n: int, label=f"{name} {side.label}") -> None:
            done[0] += n
            if progress:
                progress(label, done[0], len(items))

        tick(0)
        if bench.kind == "perplexity":
            run_perplexity(side, bench, items, cache=cache, max_length=max_length, seed=seed, rank=rank,
                           world=world, progress=tick)
        elif bench.kind == "multiple_choice":
            run_multiple_choice(side, bench, items, cache=cache, batch_size=batch_size, seed=seed, rank=rank,
                                world=world, progress=tick)
        else:
            run_generation(side, bench, items, sampler_name=sampler_name, settings=settings, cache=cache,
                           batch_size=batch_size, chat=chat, seed=seed, rank=rank, world=world, progress=tick)
    return settings, caches


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _settings_key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _batches_to_run(items: list[Item], batch_size: int, cache: "ItemCache", rank: int, world: int):
    """(number, batch) for this rank's fixed batches of ``batch_size`` items (batch number b
    belongs to rank b mod world, always the same), less the items the cache already holds;
    empty batches are skipped."""
    for k in range(0, len(items), batch_size):
        if (k // batch_size) % world != rank:
            continue
        batch = [it for it in items[k : k + batch_size] if it.id not in cache]
        if batch:
            yield k // batch_size, batch


def run_generation(side: Side, bench: Benchmark, items: list[Item], *, sampler_name: str, settings: dict,
                   cache: ItemCache, batch_size: int, chat: bool, seed: int, rank: int = 0, world: int = 1,
                   progress: Callable[[int], None] | None = None) -> None:
    sampler = get_sampler(sampler_name)
    if bench.stop and "stop" in sampler.defaults and "stop" not in settings:
        settings = {**settings, "stop": list(bench.stop)}  # stop generating where scoring would cut
    sampler.settings(settings)
    fam = side.handle.family
    for number, batch in _batches_to_run(items, batch_size, cache, rank, world):
        prompts = [bench.prompt(it, side.tokenizer, chat) for it in batch]
        _check_fits(side, batch, prompts)
        start = time.perf_counter()
        out = sampler.generate(side.model, side.tokenizer, prompts, family=fam, seed=seed + number, **settings)
        seconds = time.perf_counter() - start
        records = []
        for it, prompt, text, ids in zip(batch, prompts, out.texts, out.token_ids):
            completion = _cut(text, bench.stop)
            records.append({
                "id": it.id, "completion": completion, "metrics": bench.score(it, completion),
                "prompt_tokens": len(side.tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                "new_tokens": len(ids), "seconds": seconds / len(batch),
                "forward_passes": out.forward_passes / len(batch),
            })
        cache.add(records)
        if progress:
            progress(len(batch))


def _check_fits(side: Side, items: list[Item], prompts: list[str]) -> None:
    """Refuse an item whose prompt alone fills the model's context, before it is generated
    from (tokenizing no more of it than the context holds, however long it is)."""
    context = side.handle.family.context_length(side.handle.ckpt.config)
    if not context:
        return
    for item, prompt in zip(items, prompts):
        if len(tokenize_prefix(side.tokenizer, prompt, context, add_special_tokens=False)) >= context:
            raise RepskipError(f"item {item.id}: its prompt fills the model's context ({context} tokens), leaving "
                               "no room to generate; fix that item in the data, or leave it out with --limit")


def run_perplexity(side: Side, bench: Benchmark, items: list[Item], *, cache: ItemCache, max_length: int,
                   seed: int, rank: int = 0, world: int = 1, progress: Callable[[int], None] | None = None) -> None:
    from .likelihood import autoregressive_nll, masked_diffusion_nll

    fam = side.handle.family
    device = model_device(side.model)
    context = fam.context_length(side.handle.ckpt.config)
    if context:  # a model is never scored past its context
        max_length = min(max_length, context)
    for index, it in enumerate(items):
        if index % world != rank or it.id in cache:
            continue
        # only as much of the text as max_length tokens need is tokenized, however long the item
        ids = torch.tensor([tokenize_prefix(side.tokenizer, it.prompt, max_length)])
        start = time.perf_counter()
        if fam.generative_kind == "diffusion":
            nll, n = masked_diffusion_nll(side.model, fam, ids.to(device), fam.mask_token_id(side.handle.ckpt.config), seed=seed)
        else:
            nll, n = autoregressive_nll(side.model, fam, ids.to(device))
        cache.add([{"id": it.id, "metrics": {"nll": nll, "tokens": n}, "seconds": time.perf_counter() - start}])
        if progress:
            progress(1)


def run_multiple_choice(side: Side, bench: Benchmark, items: list[Item], *, cache: ItemCache, batch_size: int,
                        seed: int, rank: int = 0, world: int = 1,
                        progress: Callable[[int], None] | None = None) -> None:
    """Log-probabilities of every choice's continuation after the item's context (no chat
    template), the choices of ``batch_size`` items in one padded forward pass (per Monte Carlo
    draw for diffusion models, every pair drawn from ``seed``), then ``bench.score_choices``.
    Items run in the fixed batches of run_generation, each appended to the cache as it ends."""
    from .likelihood import continuation_logprobs, encode_pair

    fam = side.handle.family
    config = side.handle.ckpt.config
    mask_id = fam.mask_token_id(config) if fam.generative_kind == "diffusion" else None
    for _, batch in _batches_to_run(items, batch_size, cache, rank, world):
        pairs = [(it.prompt, cont) for it in batch for cont in bench.continuations(it)]
        start = time.perf_counter()
        scored = continuation_logprobs(side.model, fam, side.tokenizer, pairs, mask_id=mask_id,
                                       mc_samples=mc_samples(bench), seed=seed, batch_size=len(pairs),
                                       max_length=fam.context_length(config))
        seconds = time.perf_counter() - start
        records, at = [], 0
        for it in batch:
            n = len(bench.continuations(it))
            logprobs = [lp for lp, _ in scored[at : at + n]]
            tokens = [encode_pair(side.tokenizer, *pair) for pair in pairs[at : at + n]]
            at += n
            records.append({
                "id": it.id, "logprobs": logprobs, "metrics": bench.score_choices(it, logprobs),
                "scored_tokens": sum(len(cont) for _, cont in tokens),
                "input_tokens": sum(len(ctx) + len(cont) for ctx, cont in tokens),
                "seconds": seconds / len(batch),
            })
        cache.add(records)
        if progress:
            progress(len(batch))


def mc_samples(bench: Benchmark) -> int:
    """Monte Carlo draws of a multiple-choice benchmark on a diffusion model (its option)."""
    return int(bench.options.get("mc_samples") or MC_SAMPLES)
