"""What verify reports: each benchmark's retention with its interval and paired test, the
answers cut by the token cap and the empty ones, throughput, FLOPs, and the report as markdown."""

from __future__ import annotations

import json
import math
import re

import torch

from . import stats
from ..benchmark import Benchmark, Item
from ..flops import generation_flops
from .cache import ItemCache
from .runners import LENGTH_KEYS
from .sides import Side, side_cost


def summary(bench: Benchmark, items: list[Item], base: ItemCache, comp: ItemCache) -> dict:
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


def cut_by_cap(caches: dict[str, ItemCache], ids: list[str], cap: int) -> dict:
    """How many answers of each model used the whole token budget (cut short, not finished),
    and whether that is too many for the scores to mean what they say."""
    counts = {label: sum(1 for i in ids if c.records[i].get("new_tokens", 0) >= cap) for label, c in caches.items()}
    return {"cap": cap, **counts, "too_many": any(n > MAX_CUT_SHARE * len(ids) for n in counts.values())}


# An answer with nothing in it but whitespace and code fences: the model closed the block it
# was opened with, or stopped, before writing anything.
_NOTHING = re.compile(r"(\s|```[\w+#.-]*)*")


def empty_answers(caches: dict[str, ItemCache], ids: list[str]) -> dict:
    """How many answers of each model are empty, and whether the compressed model has so many
    more than the base that its score mostly counts answers it never wrote."""
    counts = {label: sum(1 for i in ids if _NOTHING.fullmatch(c.records[i].get("completion", "")))
              for label, c in caches.items()}
    return {**counts, "too_many": counts["compressed"] - counts["base"] > MAX_CUT_SHARE * len(ids)}


def throughput(cache: ItemCache, ids: list[str]) -> dict:
    recs = [cache.records[i] for i in ids]
    seconds = sum(r.get("seconds", 0.0) for r in recs)
    # generated tokens; for multiple choice the continuation tokens scored; for perplexity the text's
    tokens = sum(r.get("new_tokens", r.get("scored_tokens", r.get("metrics", {}).get("tokens", 0))) for r in recs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}


def flops_cut(base: Side, comp: Side, cache: ItemCache, ids: list[str], settings: dict) -> dict:
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


def empty_note(entry: dict) -> str:
    """A warning when the compressed model left many more answers empty than the base, or ''."""
    empty = entry.get("empty_answers") or {}
    if not empty.get("too_many"):
        return ""
    return (f"{empty['compressed']} of the compressed model's {entry['items']} answers are empty (whitespace or a "
            f"code fence only), against {empty['base']} of the base's: the score counts answers it never wrote")


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
    notes += [f"- {name}: {empty_note(e)}" for name, e in report["benchmarks"].items() if empty_note(e)]
    notes += [f"- {name}: prompt: {e['prompt_variant']}" for name, e in report["benchmarks"].items()
              if e.get("prompt_variant")]
    lines += ["", *notes] if notes else []
    lines += speed_lines(report.get("speed"))
    lines += ["", "Sampler settings per benchmark:", ""]
    lines += [f"- {name}: `{json.dumps(e['settings'])}`" for name, e in report["benchmarks"].items()]
    return "\n".join(lines) + "\n"
