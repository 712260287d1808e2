"""Verify a compressed model against its base: benchmark retention with confidence intervals
and paired tests, FLOPs reduction and measured speed, reproducibly and resumably.

Both models see the same items, prompts, sampler settings and seeds. Items run in fixed
batches (batch k always holds the same items and uses seed + k), and each finished batch is
appended to a per-model, per-benchmark cache before the next starts: an interrupted run
resumes where it stopped, never recomputes a cached item, and reaches the same scores.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from . import sandbox, speed, stats
from ..versions import versions
from ..benchmark import Benchmark, Item, get_benchmark
from ..errors import RepskipError
from ..flops import generation_flops
from ..outputs import ensure_dir, write_atomic
from ..engine.model import ModelHandle, open_model, parse_device
from ..runtime import model_device, model_dtype
from ..sampler import get_sampler
from ..textio import tokenize_prefix

# 2: per-benchmark "speed" became "throughput" (no speedup); the speed comparison is top-level
SCHEMA_VERSION = 2
SPEED_PROMPT = 128  # prompt tokens the speed comparison runs on, at most
PRESETS = Path(__file__).resolve().parents[2] / "recipes" / "presets" / "sampling.yaml"
LENGTH_KEYS = {"ar": "max_new_tokens", "dream": "max_new_tokens", "llada": "gen_length"}
MC_SAMPLES = 32  # Monte Carlo draws per choice of a multiple-choice benchmark on a diffusion model


# --- the two models -----------------------------------------------------------------------
@dataclass
class Side:
    label: str
    handle: ModelHandle
    model: Any
    tokenizer: Any
    tag: str  # names its cache: the model fingerprint, plus the in-memory removal if any
    layers: int
    removed: list[int]


def load_side(label: str, handle: ModelHandle, dtype: str | None, device: str, remove: Sequence[int] = (),
              device_map: str | None = None, provider: str = "auto", maps: dict | None = None,
              offload_folder: Path | None = None, max_memory: int | None = None) -> Side:
    """One model of the comparison; ``remove`` and the repair ``maps`` (anchor layer -> T)
    apply a recipe in memory."""
    fam = handle.family
    big = {"offload_folder": offload_folder, "max_memory": max_memory} if device_map else {}
    model = handle.load(dtype, device, device_map=device_map, provider=provider, **big)
    layers = handle.num_layers
    tag = (onnx_tag(handle.path) if handle.onnx else handle.ckpt.fingerprint().replace("sha256:", "")[:16])
    if maps:
        from ..repair.fit import fold_in_memory
        from ..repair.store import serialize

        fold_in_memory(model, fam, maps)
        tag += "-repair" + serialize(maps)[1].replace("sha256:", "")[:8]
    if remove:
        kept = [i for i in range(layers) if i not in set(remove)]
        fam.remove_layers(model, kept)
        tag += "-skip" + "_".join(map(str, remove))
        layers = len(kept)
    return Side(label, handle, model, fam.load_tokenizer(handle.path), tag, layers, list(remove))


def side_cost(side: Side) -> Any:
    """What a side computes (repskip.flops.ModelCost): its checkpoint's layers, less those it
    removes in memory."""
    cost = side.handle.family.cost(side.handle.ckpt.config)
    gone = set(side.removed)
    return cost.keep([i for i in range(cost.num_layers) if i not in gone])


def onnx_tag(path: Path) -> str:
    """Cache tag of an ONNX export: its export record (recipe, parity, versions) and file size."""
    from ..formats import META_FILE, ONNX_FILE

    digest = hashlib.sha256()
    for name in (META_FILE, "config.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    digest.update(str((path / ONNX_FILE).stat().st_size).encode())
    return "onnx-" + digest.hexdigest()[:16]


def check_made_from(base: ModelHandle, compressed: ModelHandle) -> None:
    """Warn when the compressed model does not say it was made from ``base``: its recipe
    records the fingerprint of the model it was cut from."""
    from ..compress.files import RECIPE_NAME
    from ..recipe import load as load_recipe

    recipe_file = compressed.path / RECIPE_NAME
    if not recipe_file.is_file():
        warnings.warn(f"{compressed.path} carries no {RECIPE_NAME}: nothing says it was made from {base.path}; "
                      "retention compares two models only if one is a compressed copy of the other", stacklevel=2)
        return
    try:
        made = load_recipe(recipe_file).resolved
    except RepskipError as exc:
        warnings.warn(f"cannot tell what {compressed.path} was made from ({exc})", stacklevel=2)
        return
    origin = made.model if made else None
    if origin is not None and origin.fingerprint != base.ckpt.fingerprint():
        warnings.warn(f"{compressed.path} was made from another model ({origin.name_or_path or origin.fingerprint}) "
                      f"than {base.path}: the retention figures compare unrelated models", stacklevel=2)


def check_same_tokenizer(a: Side, b: Side) -> None:
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise RepskipError(
            f"base and compressed use different tokenizers ({a.handle.path} vs {b.handle.path}); "
            "verify compares a model with a compressed copy of itself"
        )


# --- sampler settings ---------------------------------------------------------------------
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


# --- the per-item cache ---------------------------------------------------------------------
class ItemCache:
    """One JSON line per finished item; a batch is appended in one write and fsynced.

    Under several processes each rank appends to its own file (``stem.rankN.jsonl``) and
    reads them all, so an item finished by any rank, in any earlier run, counts as done.
    A line cut short by a killed run is skipped (its item is recomputed once) and the file
    is rewritten without it; a file that is not a cache at all is a one-line error.
    """

    def __init__(self, folder: Path, stem: str, rank: int = 0, world: int = 1):
        self.path = folder / (f"{stem}.jsonl" if world == 1 else f"{stem}.rank{rank}.jsonl")
        self.folder, self.stem = folder, stem
        self.records: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        files = sorted(self.folder.glob(f"{self.stem}.jsonl")) + sorted(self.folder.glob(f"{self.stem}.rank*.jsonl"))
        for path in files:
            kept, torn = self._read(path)
            for line, record in kept:
                self.records.setdefault(record["id"], record)
            if torn and path == self.path:  # only the owner rewrites: other ranks may be appending
                warnings.warn(f"{path}: skipped {torn} record(s) cut short by an interrupted run; "
                              "those items are computed again", stacklevel=2)
                write_atomic(path, "".join(line + "\n" for line, _ in kept))

    @staticmethod
    def _read(path: Path) -> tuple[list[tuple[str, dict]], int]:
        """(valid lines with their records, number of torn lines)."""
        fix = "delete it or choose another --output"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RepskipError(f"cannot read the verify cache {path} ({exc.strerror}); {fix}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if b"\0" in raw or (raw and not text):
            raise RepskipError(f"{path} is not a repskip verify cache (binary data); {fix}")
        kept, torn = [], 0
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a write cut short, or two such merged: redone
                torn += 1
                continue
            problem = _record_problem(record)
            if problem:
                raise RepskipError(f"{path} line {lineno} is not a verify record ({problem}); {fix}")
            kept.append((line, record))
        return kept, torn

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def add(self, records: list[dict]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in records))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise RepskipError(f"writing the verify cache {self.path} failed ({exc.strerror or exc}); items "
                               "finished so far are kept: free space and run the same command again") from None
        self.records.update({r["id"]: r for r in records})


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("id"), str):
        return "no string 'id'"
    metrics = record.get("metrics")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        return "'metrics' is not a mapping of numbers"
    return None


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _settings_key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- running one benchmark on one model ------------------------------------------------------
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


# --- the comparison -----------------------------------------------------------------------------
def _summary(bench: Benchmark, items: list[Item], base: ItemCache, comp: ItemCache) -> dict:
    ids = [it.id for it in items]
    if bench.kind == "perplexity":
        b_nll = [base.records[i]["metrics"]["nll"] for i in ids]
        c_nll = [comp.records[i]["metrics"]["nll"] for i in ids]
        tokens = [base.records[i]["metrics"]["tokens"] for i in ids]

        def ppl(nll, toks):
            return float(torch.tensor(sum(nll) / sum(toks)).exp())

        def ratio(b, c):  # resampled item indices arrive as paired (nll, tokens) tuples
            return stats.retention(ppl([x for x, _ in b], [t for _, t in b]), ppl([x for x, _ in c], [t for _, t in c]), False)

        pairs_b, pairs_c = list(zip(b_nll, tokens)), list(zip(c_nll, tokens))
        base_score, comp_score = ppl(b_nll, tokens), ppl(c_nll, tokens)
        ci = stats.bootstrap_ci(pairs_b, pairs_c, ratio)
        per_b = [x / t for x, t in zip(b_nll, tokens)]
        per_c = [x / t for x, t in zip(c_nll, tokens)]
        test, p = stats.paired_test(per_b, per_c)
        metric, higher = "perplexity", False
        # a DETECT_DROP loss of retention is this much more NLL per token
        check = stats.informative(per_b, per_c, base_score, ci, False, -math.log(1 - stats.DETECT_DROP))
    else:
        metric, higher = bench.primary_metric, bench.higher_is_better
        b = [float(base.records[i]["metrics"][metric]) for i in ids]
        c = [float(comp.records[i]["metrics"][metric]) for i in ids]
        base_score, comp_score = sum(b) / len(b), sum(c) / len(c)
        ci = stats.bootstrap_ci(b, c, lambda x, y: stats.retention(sum(x) / len(x), sum(y) / len(y), higher))
        test, p = stats.paired_test(b, c)
        check = stats.informative(b, c, base_score, ci, higher, stats.DETECT_DROP * abs(base_score))
    return {
        "items": len(ids), "metric": metric, "higher_is_better": higher,
        "base": base_score, "compressed": comp_score,
        "retention": stats.retention(base_score, comp_score, higher),
        "retention_ci95": list(ci), "test": test, "p_value": p,
        # a base that scores (almost) nothing, or an interval too wide, says little
        "uninformative": check["uninformative"], "uninformative_why": check["why"],
        "power": {k: check[k] for k in ("items_needed", "detect_drop", "alpha", "power")},
    }


# Answers that end at the token cap, not at a stop: above this share the scores mostly say
# how long the answers were allowed to be.
MAX_CUT_SHARE = 0.1


def _cut_by_cap(caches: dict[str, ItemCache], ids: list[str], cap: int) -> dict:
    """How many answers of each model used the whole token budget (cut short, not finished),
    and whether that is too many for the scores to mean what they say."""
    counts = {label: sum(1 for i in ids if c.records[i].get("new_tokens", 0) >= cap) for label, c in caches.items()}
    return {"cap": cap, **counts, "too_many": any(n > MAX_CUT_SHARE * len(ids) for n in counts.values())}


def _speed(cache: ItemCache, ids: list[str]) -> dict:
    recs = [cache.records[i] for i in ids]
    seconds = sum(r.get("seconds", 0.0) for r in recs)
    # generated tokens; for multiple choice the continuation tokens scored; for perplexity the text's
    tokens = sum(r.get("new_tokens", r.get("scored_tokens", r.get("metrics", {}).get("tokens", 0))) for r in recs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}


def _flops(base: Side, comp: Side, cache: ItemCache, ids: list[str], settings: dict) -> dict:
    fam = base.handle.family
    recs = [cache.records[i] for i in ids]
    prompt = max(1, round(sum(r.get("prompt_tokens", 0) for r in recs) / len(recs)))
    kind = fam.generative_kind
    length = LENGTH_KEYS.get(settings.get("_sampler", ""), "max_new_tokens")
    if kind == "diffusion":
        gen = int(settings[length])
        steps = int(settings.get("steps", gen))
    else:
        gen = max(1, round(sum(r.get("new_tokens", 0) for r in recs) / len(recs)))
        steps = None
    cfg = bool(settings.get("cfg_scale", 0))
    head = int(settings.get("block_length") or gen) if kind == "diffusion" else None
    full = generation_flops(side_cost(base), kind, prompt, gen, steps=steps, cfg=cfg, logits_per_pass=head)
    cut = generation_flops(side_cost(comp), kind, prompt, gen, steps=steps, cfg=cfg, logits_per_pass=head)
    return {
        "layer_fraction": 1 - comp.layers / base.layers,
        "per_generated_token": {"base": full.per_generated_token, "compressed": cut.per_generated_token,
                                "prompt_tokens": prompt, "generated_tokens": gen, "forward_passes": full.forward_passes},
        "reduction": 1 - cut.total / full.total,
    }


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate launch; (0, 1, 0) alone.
    With several processes a gloo process group is started for the final barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _hardware(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def verify(
    base: str | Path,
    compressed: str | Path | None = None,
    *,
    recipe: str | Path | None = None,
    benches: Sequence[str] = ("gsm8k",),
    data: dict[str, str] | None = None,
    limit: int | None = None,
    output: str | Path = "runs/verify",
    batch_size: int = 8,
    chat: bool = True,
    seed: int = 0,
    sampler: str | None = None,
    overrides: dict | None = None,
    presets: str | Path | None = None,
    bench_options: dict[str, dict] | None = None,
    max_length: int = 1024,
    dtype: str | None = None,
    device: str = "cpu",
    device_map: str | None = None,
    max_memory: int | None = None,
    offload_folder: str | Path | None = None,
    provider: str = "auto",
    allow_unsafe_code_execution: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
    speed_repeats: int = speed.REPEATS,
    card: bool = False,
) -> dict:
    """Run every benchmark on base and compressed and return the report (also written to
    ``output``/report.json and report.md). Give ``compressed`` (a checkpoint) or ``recipe``
    (a resolved recipe applied to the base in memory). ``card``: add the retention table to
    the compressed model's card (README.md), which must be one repskip wrote, unchanged. Benchmarks that run generated code
    need the sandbox's OS isolation; ``allow_unsafe_code_execution`` runs them without it
    where the platform has none (see repskip.verify.sandbox). ``progress(label, done, total)``
    follows each benchmark and side; ``say`` gets a line at each step before them (loading).
    A model too big for the device: ``device_map`` ("auto"), with ``max_memory`` bytes on the
    device and the rest in a fresh folder inside ``offload_folder`` (default: the system's
    temporary folder), removed at the end."""
    from .. import card as _card
    from ..checkpoint import resolve_model
    from ..engine.offload import spread_folder

    if card:  # before any work: the card must be there, and repskip's to change
        if compressed is None:
            raise RepskipError("--card adds the retention table to the compressed model's card: give the compressed "
                               "model's folder, not --recipe")
        folder = resolve_model(compressed)
        text = _card.read(folder)
        if text is None or not _card.is_sealed(text):
            why = "has no README.md" if text is None else "has a README.md that repskip did not write or that was edited since"
            raise RepskipError(f"--card: {folder} {why}; repskip changes only its own cards (drop --card; the table "
                               "is in report.md)")
    with spread_folder(device_map, max_memory, offload_folder, resolve_model(base)) as scratch:
        report = _verify(base, compressed, recipe, benches, data, limit, output, batch_size, chat, seed, sampler,
                         overrides, presets, bench_options, max_length, dtype, device, device_map, max_memory, scratch,
                         provider, allow_unsafe_code_execution, progress, say, speed_repeats)
    if card and report and _card.update(resolve_model(compressed), "verify", _card.verify_section(report)):
        (say or (lambda _text: None))(f"added the retention table to {resolve_model(compressed) / _card.CARD_NAME}")
    return report


def _verify(base, compressed, recipe, benches, data, limit, output, batch_size, chat, seed, sampler, overrides, presets,
            bench_options, max_length, dtype, device, device_map, max_memory, scratch, provider,
            allow_unsafe_code_execution, progress, say, speed_repeats) -> dict:
    from .. import recipe as recipe_mod
    from ..recipe import removed_layers

    if (compressed is None) == (recipe is None):
        raise RepskipError("give a compressed model or --recipe, not both and not neither")
    if limit is not None and limit < 1:
        raise RepskipError("--limit must be at least 1")
    rank, world, local_rank = distributed()
    if device.startswith("cuda") and world > 1 and ":" not in device:
        device = f"cuda:{local_rank}"  # one GPU per process
    device = parse_device(device)
    base_handle = open_model(base)
    comp_handle = base_handle if compressed is None else open_model(compressed, allow_onnx=True)
    out_dir = Path(output)
    for name, path in (data or {}).items():
        if name not in benches:
            raise RepskipError(f"--data names {name!r}, which is not among the benchmarks run ({', '.join(benches)})")
        if not Path(path).expanduser().exists():
            raise RepskipError(f"--data {name}={path}: no such file; give the path of {name}'s data file")
    benchmarks = {}
    for name in benches:
        bench = get_benchmark(name, **(bench_options or {}).get(name, {}))
        if bench.runs_code:  # before any model loads: can its code be run safely here?
            sandbox.require_isolation(name, allow_unsafe_code_execution)
        items = bench.load((data or {}).get(name))
        if limit is not None:
            if limit > len(items):
                raise RepskipError(f"--limit {limit} is larger than {name}'s {len(items)} items")
            items = items[:limit]
        benchmarks[name] = (bench, items)
    # arguments checked: now write
    ensure_dir(out_dir, [base_handle.path, comp_handle.path], command="verify", owned=_earlier_verify_run)
    say = say or (lambda text: None)
    say(f"writing to {out_dir}")
    maps: dict = {}
    if recipe is not None:
        loaded = recipe_mod.load(recipe)
        remove = removed_layers(loaded, base_handle)
        maps = loaded.repair_maps(base_handle.family.hidden_size(base_handle.ckpt.config))
        comp_label = f"{base_handle.path} with recipe {recipe}"
    else:
        remove = []
        comp_label = str(compressed)
        if comp_handle.path.resolve() != base_handle.path.resolve():  # a model against itself is a fair check
            check_made_from(base_handle, comp_handle)
    say(f"loading the base model {base_handle.path.name}")
    base_side = load_side("base", base_handle, dtype, device, device_map=device_map, offload_folder=scratch,
                          max_memory=max_memory)
    say(f"loading the compressed model {comp_label}")
    comp_side = load_side("compressed", comp_handle, dtype, device, remove, device_map=device_map, provider=provider,
                          maps=maps, offload_folder=scratch, max_memory=max_memory)
    check_same_tokenizer(base_side, comp_side)
    sampler_name = sampler or base_handle.family.default_sampler
    get_sampler(sampler_name, base_handle.family)  # the right kind for this model, or a clear error
    table = load_presets(presets)
    runs = {}
    with sandbox.allow_unsafe_execution(allow_unsafe_code_execution):
        for name, (bench, items) in benchmarks.items():
            runs[name] = _run_benchmark(name, bench, items, (base_side, comp_side), out_dir=out_dir, table=table,
                                        sampler_name=sampler_name, overrides=overrides or {}, chat=chat, seed=seed,
                                        batch_size=batch_size, max_length=max_length, rank=rank, world=world,
                                        progress=progress)
    _barrier(world)  # every rank's items are in the caches now
    if rank != 0:
        return {}
    report_benchmarks = {}
    for name, (bench, items) in benchmarks.items():
        settings, caches = runs[name]
        for cache in caches.values():
            cache.reload()
        ids = [it.id for it in items]
        entry = _summary(bench, items, caches["base"], caches["compressed"])
        entry["settings"] = settings
        # what each run's batches took: a record, not a comparison (see report["speed"])
        entry["throughput"] = {label: _speed(c, ids) for label, c in caches.items()}
        if bench.kind == "multiple_choice":  # every metric's mean (acc beside acc_norm)
            entry["metrics"] = {m: {label: sum(c.records[i]["metrics"][m] for i in ids) / len(ids)
                                    for label, c in caches.items()}
                                for m in caches["base"].records[ids[0]]["metrics"]}
        if bench.kind == "generation":
            entry["flops"] = _flops(base_side, comp_side, caches["base"], ids, {**settings, "_sampler": sampler_name})
            entry["prompt_variant"] = bench.prompt_variant(base_side.tokenizer, chat)
            if sampler_name == "ar":  # a diffusion canvas has its length by construction
                entry["cut_by_cap"] = _cut_by_cap(caches, ids, int(settings["max_new_tokens"]))
        report_benchmarks[name] = entry
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "repskip.verify",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": {"path": str(base_handle.path), "layers": base_side.layers, "fingerprint": base_handle.ckpt.fingerprint()},
        "compressed": {"path": comp_label, "layers": comp_side.layers, "removed": remove or None,
                       "format": "onnx" if comp_handle.onnx else "safetensors",
                       "fingerprint": comp_side.tag if comp_handle.onnx else comp_handle.ckpt.fingerprint(),
                       **({"provider": comp_side.model.session.provider,
                           "dtype": str(model_dtype(comp_side.model)).replace("torch.", "")} if comp_handle.onnx else {})},
        "settings": {"sampler": sampler_name, "chat": chat, "seed": seed, "batch_size": batch_size, "limit": limit,
                     "processes": world,
                     "dtype": str(model_dtype(base_side.model)).replace("torch.", ""), "device": device, "device_map": device_map,
                     "max_memory": max_memory,
                     "presets": str(presets or PRESETS), "data": data or {}, "max_length": max_length,
                     # generated code that ran without the sandbox's isolation, by the user's choice
                     "unsafe_code_execution": any(b.runs_code for b, _ in benchmarks.values())
                     and not sandbox.isolation().available},
        "hardware": _hardware(device),
        "versions": versions(),
        "benchmarks": report_benchmarks,
        "speed": _speed_comparison(base_side, comp_side, benchmarks, runs, chat, speed_repeats, progress),
    }
    write_atomic(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    write_atomic(out_dir / "report.md", markdown(report))
    return report


def _speed_comparison(base: Side, comp: Side, benchmarks: dict, runs: dict, chat: bool, repeats: int,
                      progress: Callable[[str, int, int], None] | None) -> dict | None:
    """repskip.verify.speed on the first benchmark's first prompt (as that benchmark words it,
    at most SPEED_PROMPT tokens); a generation benchmark's settings give a diffusion model its
    canvas and steps. None with ``repeats`` 0."""
    if repeats < 1:
        return None
    name, (bench, items) = next(iter(benchmarks.items()))
    text = bench.prompt(items[0], base.tokenizer, chat) if bench.kind == "generation" else items[0].prompt
    ids = torch.tensor([tokenize_prefix(base.tokenizer, text, SPEED_PROMPT, add_special_tokens=False) or [0]])
    fam = base.handle.family
    settings = runs[name][0] if bench.kind == "generation" else {}
    kind = fam.generative_kind
    length = int(settings.get("gen_length") or settings.get("max_new_tokens") or speed.NEW_TOKENS)
    tick = (lambda done, total: progress("speed", done, total)) if progress else None  # noqa: E731
    result = speed.measure(
        base, comp, ids, kind=kind, costs=(side_cost(base), side_cost(comp)),
        new_tokens=speed.NEW_TOKENS if kind == "autoregressive" else length, steps=settings.get("steps"),
        mask_id=fam.mask_token_id(base.handle.ckpt.config) if kind == "diffusion" else None, repeats=repeats,
        progress=tick)
    return {"prompt_from": f"{name}/{items[0].id}", **result}


def _run_benchmark(name: str, bench: Benchmark, items: list[Item], sides: tuple[Side, Side], *, out_dir: Path,
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


def _earlier_verify_run(path: Path) -> bool:
    """A verify folder from before the output marker: a cache and reports, nothing else."""
    return (path / "cache").is_dir() and {p.name for p in path.iterdir()} <= {"cache", "report.json", "report.md"}


def failing(report: dict, min_retention: float) -> list[str]:
    return [n for n, e in report["benchmarks"].items() if e["retention"] < min_retention]


def speed_lines(result: dict | None) -> list[str]:
    """The speed comparison as lines of text (report.md and the terminal)."""
    if not result:
        return []
    b, c, up, ideal = result["base"], result["compressed"], result["speedup"], result["flops_ideal"]

    def ratio(name: str) -> str:
        r = up.get(name) or {}
        return f"{r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f})" if r else "-"

    head = (f"Speed (batch 1, {result['prompt_tokens']}-token prompt from {result['prompt_from']}, median of "
            f"{result['repeats']} alternating repeats):")
    if "prefill_ms" in b:
        return ["", head, "",
                f"- prefill: {b['prefill_ms']:.1f} ms -> {c['prefill_ms']:.1f} ms, {ratio('prefill')}",
                f"- decode: {b['decode_ms_per_token']:.2f} ms -> {c['decode_ms_per_token']:.2f} ms per token, "
                f"{ratio('decode')}; FLOPs ideal {ideal['decode']:.2f}x",
                f"- generation of {result['new_tokens']} tokens: {b['tokens_per_s']:.1f} -> {c['tokens_per_s']:.1f} "
                f"tokens/s, {ratio('generation')}; FLOPs ideal {ideal['generation']:.2f}x"]
    return ["", head, "",
            f"- denoising step ({result['gen_length']}-token canvas): {b['step_ms']:.1f} ms -> {c['step_ms']:.1f} ms, "
            f"{ratio('step')}; FLOPs ideal {ideal['step']:.2f}x",
            f"- {result['steps']} steps: {b['tokens_per_s']:.1f} -> {c['tokens_per_s']:.1f} tokens/s"]


def cut_note(entry: dict) -> str:
    """A warning when many answers ran into the token cap, or ''."""
    cut = entry.get("cut_by_cap") or {}
    if not cut.get("too_many"):
        return ""
    return (f"{cut['base']} of the base's and {cut['compressed']} of the compressed model's {entry['items']} "
            f"answers ran into the {cut['cap']}-token cap: the scores count unfinished answers; raise it with "
            f"--set max_new_tokens=N")


def items_needed_note(entry: dict) -> str:
    """'; about N items would ...' from a report entry's power calculation, or ''."""
    power = entry.get("power") or {}
    if not power.get("items_needed"):
        return ""
    return (f"; about {power['items_needed']} items would let the paired test see a "
            f"{power['detect_drop']:.0%} loss of retention (power {power['power']}, alpha {power['alpha']})")


def markdown(report: dict) -> str:
    lines = [
        "# repskip verify report", "",
        f"- base: `{report['base']['path']}` ({report['base']['layers']} layers)",
        f"- compressed: `{report['compressed']['path']}` ({report['compressed']['layers']} layers)",
        f"- sampler `{report['settings']['sampler']}`, dtype {report['settings']['dtype']}, "
        f"device {report['settings']['device']}, seed {report['settings']['seed']}, "
        f"chat template {'on' if report['settings']['chat'] else 'off'}",
        f"- created {report['created']} with repskip {report['versions']['repskip']}, "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}",
        "",
        "| benchmark | items | metric | base | compressed | retention | 95% CI | paired test p | FLOPs cut (layers / exact) | batch throughput, tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["benchmarks"].items():
        lo, hi = e["retention_ci95"]
        fl = e.get("flops")
        flops = f"{fl['layer_fraction']:.1%} / {fl['reduction']:.1%}" if fl else "-"
        sp = e["throughput"]
        tps = (f"{sp['base']['tokens_per_s']:.1f} -> {sp['compressed']['tokens_per_s']:.1f}"
               if sp["base"]["tokens_per_s"] and sp["compressed"]["tokens_per_s"] else "-")
        ret = f"{e['retention']:.3f}" + (" (uninformative)" if e.get("uninformative") else "")
        lines.append(f"| {name} | {e['items']} | {e['metric']} | {e['base']:.4g} | {e['compressed']:.4g} | "
                     f"{ret} | {lo:.3f} - {hi:.3f} | {e['p_value']:.3g} ({e['test']}) | {flops} | {tps} |")
    notes = [f"- {name}: uninformative: {e['uninformative_why']}" + items_needed_note(e)
             for name, e in report["benchmarks"].items() if e.get("uninformative")]
    notes += [f"- {name}: {cut_note(e)}" for name, e in report["benchmarks"].items() if cut_note(e)]
    notes += [f"- {name}: prompt: {e['prompt_variant']}" for name, e in report["benchmarks"].items()
              if e.get("prompt_variant")]
    lines += ["", *notes] if notes else []
    lines += speed_lines(report.get("speed"))
    lines += ["", "Sampler settings per benchmark:", ""]
    lines += [f"- {name}: `{json.dumps(e['settings'])}`" for name, e in report["benchmarks"].items()]
    return "\n".join(lines) + "\n"
