"""Verify a compressed model against its base: benchmark retention with confidence intervals
and paired tests, FLOPs reduction and measured speed, reproducibly and resumably.

Both models see the same items, prompts, sampler settings and seeds. Items run in fixed
batches (batch k always holds the same items and uses seed + k), and each finished batch is
appended to a per-model, per-benchmark cache before the next starts: an interrupted run
resumes where it stopped, never recomputes a cached item, and reaches the same scores.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import sandbox, speed
from ..benchmark import get_benchmark
from ..engine.model import open_model, parse_device
from ..errors import RepskipError
from ..outputs import ensure_dir, write_atomic
from ..runtime import model_dtype
from ..sampler import get_sampler
from ..textio import tokenize_prefix
from ..versions import versions
from .report import cut_by_cap, empty_answers, flops_cut, markdown, summary, throughput
from .runners import PRESETS, load_presets, run_benchmark
from .sides import Side, check_made_from, check_same_tokenizer, load_side, side_cost

# 2: per-benchmark "speed" became "throughput" (no speedup); the speed comparison is top-level
SCHEMA_VERSION = 2
SPEED_PROMPT = 128  # prompt tokens the speed comparison runs on, at most


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
            runs[name] = run_benchmark(name, bench, items, (base_side, comp_side), out_dir=out_dir, table=table,
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
        entry = summary(bench, items, caches["base"], caches["compressed"])
        entry["settings"] = settings
        # what each run's batches took: a record, not a comparison (see report["speed"])
        entry["throughput"] = {label: throughput(c, ids) for label, c in caches.items()}
        if bench.kind == "multiple_choice":  # every metric's mean (acc beside acc_norm)
            entry["metrics"] = {m: {label: sum(c.records[i]["metrics"][m] for i in ids) / len(ids)
                                    for label, c in caches.items()}
                                for m in caches["base"].records[ids[0]]["metrics"]}
        if bench.kind == "generation":
            entry["flops"] = flops_cut(base_side, comp_side, caches["base"], ids, {**settings, "_sampler": sampler_name})
            entry["prompt_variant"] = bench.prompt_variant(base_side.tokenizer, chat)
            entry["empty_answers"] = empty_answers(caches, ids)
            if sampler_name == "ar":  # a diffusion canvas has its length by construction
                entry["cut_by_cap"] = cut_by_cap(caches, ids, int(settings["max_new_tokens"]))
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


def _earlier_verify_run(path: Path) -> bool:
    """A verify folder from before the output marker: a cache and reports, nothing else."""
    return (path / "cache").is_dir() and {p.name for p in path.iterdir()} <= {"cache", "report.json", "report.md"}
