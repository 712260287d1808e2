"""Quality per layer removed: which layers to remove, with or without a linear repair.

For SmolLM2-135M-Instruct (or --model), every combination of k (--ks), strategy
(--strategies) and repair (--repairs) is chosen and fitted exactly as ``repskip analyze``
does it (one similarity analysis shared by the similarity strategies, a loss search per
repair setting for the loss strategies, then ``fit_linear`` on the full calibration set),
applied in memory (maps folded into the MLP output projections, layers removed) and
measured against the full model on the same items:

- WikiText-2 test perplexity on --ppl-windows non-overlapping windows of --ppl-length
  tokens; retention = base PPL / compressed PPL, 95% paired bootstrap interval over windows;
- ARC-Easy / ARC-Challenge acc_norm (lm-eval's definition, repskip's ``arc_*`` benchmarks)
  on --arc-items items (0: the whole test set), for the configurations --arc-for names;
  retention = compressed / base, paired bootstrap interval over items.

Calibration (analysis, search and fit) is WikiText-2 *validation* text, the evaluation its
*test* text. Every finished step is appended to a cache (--cache, JSON lines, each line
stamped with its commit and time), so a killed or extended run redoes nothing. The default
cache is kept with the repository (bench/results/cache/quality.jsonl), so that a table too
long for one sitting is finished in the next; the repair maps it fits are not (--maps), and a
row whose maps are missing is fitted again before anything is measured on it. The results,
with the command, commit and machine, go to --json.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _measure import CACHE, Cache, arc_acc_norm, load_arc, ppl, ppl_windows, window_nll  # noqa: E402

DATA = _common.REPO.parent / "shared" / "data"
SIMILARITY = ("paper", "block-influence", "angular-block")
LOSS = ("loss", "greedy-loss")
MODEL_RUN = (*LOSS, "auto")  # choosing runs the model
# Part of a repaired row's cache key: bump it when the fit changes what it returns, so that a
# cache never serves maps the current code would not make (2: the KL check of 721a59c).
FIT_VERSION = 2
# Likewise for the cosine repair alone (2: the map's size set by least squares, not the ridge).
COSINE_VERSION = 2
# Part of a repaired loss search's cache key, likewise (2: a chosen candidate is scored with the
# map the final fit's check keeps). A row chosen by an older search is reused only where the
# current search chooses the same layers.
SEARCH_VERSION = 2
# Part of an auto choice's cache key, likewise.
AUTO_VERSION = 2  # 2: maps scored as fitted, the winner checked (as the loss search)


def cosine_tag(repair: str) -> str:
    """The cosine fit's version in its rows' keys (none for the other repairs: their keys stand)."""
    return f"|cos{COSINE_VERSION}" if repair == "cosine" else ""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder [default: SmolLM2-135M-Instruct]")
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--strategies", default="paper,block-influence,angular-block,greedy-loss,auto")
    p.add_argument("--repairs", default="none,linear")
    p.add_argument("--calib", default=str(DATA / "wikitext2" / "valid.txt"))
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--search-samples", type=int, default=16)
    p.add_argument("--search-depth", type=int, default=0,
                   help="greedy rounds [default: the largest k]; greedy rows with a larger k are left out")
    p.add_argument("--ppl-text", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--ppl-windows", type=int, default=32)
    p.add_argument("--ppl-length", type=int, default=256)
    p.add_argument("--arc", default="arc_easy,arc_challenge", help="multiple-choice benchmarks ('' for none)")
    p.add_argument("--arc-items", type=int, default=0, help="first N items of each (0: all)")
    p.add_argument("--arc-for", default="base,6/paper/none,6/best",
                   help="configurations measured on ARC (the base too, whenever any is): 'base', "
                        "K/STRATEGY/REPAIR, K/best (the best PPL at K but auto's, and auto/linear), "
                        "K/all (every row at K), all")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--maps", default=str(Path.home() / ".cache" / "repskip" / "bench-quality-maps"),
                   help="folder for the fitted repair maps (not kept with the repository)")
    p.add_argument("--json", default=_common.default_json("quality"))
    return p.parse_args()


def main() -> None:
    args = parse()
    import numpy as np
    import torch

    from repskip import pipeline
    from repskip import recipe as R
    from repskip.repair import store
    from repskip.verify import stats

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else _common.default_model()
    handle = pipeline.open_model(model_path)
    fam = handle.family
    fingerprint = handle.ckpt.fingerprint()
    cache = Cache(args.cache)
    ks = [int(k) for k in args.ks.split(",")]
    strategies = args.strategies.split(",")
    repairs = args.repairs.split(",")
    cal = R.CalibrationSpec(source=args.calib, num_samples=args.num_samples, max_length=args.max_length)
    prefix = f"{fingerprint[:23]}|{Path(args.calib).name}|{args.num_samples}x{args.max_length}"
    maps_dir = Path(args.maps)
    maps_dir.mkdir(parents=True, exist_ok=True)

    base = handle.load("float32", "cpu")
    base.eval()
    tokenizer = fam.load_tokenizer(handle.path)
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731

    # --- choosing: one analysis, the loss searches, the fits --------------------------
    analysis = None

    def get_analysis():
        nonlocal analysis
        if analysis is None:
            t = time.perf_counter()
            analysis = pipeline.analyze(handle, calib=cal.source, num_samples=cal.num_samples,
                                        max_length=cal.max_length, torch_model=base)
            say(f"analysis: {time.perf_counter() - t:.0f} s")
            analysis.seconds = time.perf_counter() - t
        return analysis

    def search_record(strategy: str, repair: str) -> dict:
        depth = (args.search_depth or max(ks)) if strategy == "greedy-loss" else 1
        key = f"{prefix}|search|{strategy}|{repair}|{args.search_samples}"
        if repair != "none":
            key += f"|search{SEARCH_VERSION}"
        hit = cache.get(key)
        if hit and (strategy != "greedy-loss" or len(hit["search"]["rounds"]) >= depth):
            return hit["search"]
        say(f"search {strategy} repair={repair} k={depth} ...")
        sel = R.SelectionSpec(strategy=strategy, k=depth, repair=repair, search_samples=args.search_samples)
        record = pipeline.loss_search(handle, base, sel, cal)
        say(f"search {strategy} repair={repair}: {record['seconds']:.0f} s")
        return cache.put(key, search=record)["search"]

    def auto_record(k: int, repair: str) -> dict:
        key = f"{prefix}|auto|{k}|{repair}|{args.search_samples}|auto{AUTO_VERSION}|fit{FIT_VERSION}" + cosine_tag(repair)
        hit = cache.get(key)
        if hit:
            return hit["auto"]
        sel = R.SelectionSpec(strategy="auto", k=k, repair=repair, search_samples=args.search_samples)
        record = pipeline.auto_search(handle, base, get_analysis(), sel, cal)
        say(f"auto k={k} repair={repair}: {record['chosen']} of {len(record['candidates'])} candidates, "
            f"{record['seconds']:.0f} s")
        return cache.put(key, auto=record)["auto"]

    def choose(k: int, strategy: str, repair: str) -> dict:
        key = older = f"{prefix}|choose|{k}|{strategy}|{repair}|{args.search_samples}"
        if repair != "none":
            key = older = key + f"|fit{FIT_VERSION}" + cosine_tag(repair)
            if strategy in LOSS:
                key += f"|search{SEARCH_VERSION}"
        if strategy == "auto":
            key += f"|auto{AUTO_VERSION}"
        have_maps = lambda record: not record["maps"] or Path(record["maps"]).is_file()  # noqa: E731
        hit = cache.get(key)
        if hit and have_maps(hit):
            return hit
        sel = R.SelectionSpec(strategy=strategy, k=k, repair=repair, search_samples=args.search_samples)
        result = get_analysis()
        seconds = result.seconds
        if strategy in LOSS:
            record = search_record(strategy, repair)
            result.data["search"] = record
            seconds += record["seconds"]
        elif strategy == "auto":
            record = auto_record(k, repair)
            result.data["auto"] = record
            seconds += record["seconds"]
        resolved = R.resolve(R.Recipe(selection=sel, calibration=cal), result)
        layers = list(resolved.resolved.remove)
        hit = cache.get(older) if older != key else None
        if hit and hit["layers"] == layers and have_maps(hit):  # an older search chose the same: the same fit
            say(f"k={k} {strategy} repair={repair}: {layers}, as the older search chose")
            same = {n: v for n, v in hit.items() if n != "key"}
            return cache.put(key, **{**same, "select_seconds": round(seconds, 1)})
        maps_file, fit_seconds, residual, anchors, sha, checks = None, 0.0, None, [], None, None
        if repair != "none":
            t = time.perf_counter()
            fit = pipeline.fit_repair(handle, base, layers, sel, cal)
            fit_seconds = time.perf_counter() - t
            checks = fit.details
            if fit.maps:  # else every run's map was dropped: the row is plain removal
                raw, digest = store.serialize(fit.maps)
                maps_file = maps_dir / f"{digest.replace('sha256:', '')[:16]}.safetensors"
                maps_file.write_bytes(raw)
                residual = {str(a): round(v, 4) for a, v in fit.residual.items()}
                anchors, sha = sorted(fit.maps), digest
        say(f"k={k} {strategy} repair={repair}: {layers} (fit {fit_seconds:.0f} s)")
        return cache.put(key, layers=layers, maps=str(maps_file) if maps_file else None,
                         select_seconds=round(seconds, 1), fit_seconds=round(fit_seconds, 1), residual=residual,
                         anchors=anchors, sha256=sha, fit_details=checks)

    def build(config: dict | None):
        if config is None:
            return base
        model = copy.deepcopy(base)
        if config["maps"]:
            from repskip.repair.fit import fold_in_memory

            maps = store.load(Path(config["maps"]), config["sha256"], config["anchors"],
                              fam.hidden_size(handle.ckpt.config))
            fold_in_memory(model, fam, maps)
        kept = [i for i in range(handle.num_layers) if i not in set(config["layers"])]
        fam.remove_layers(model, kept)
        return model

    # --- measuring ----------------------------------------------------------------------
    windows = ppl_windows(tokenizer, args.ppl_text, args.ppl_windows, args.ppl_length)
    benches = load_arc(args.arc, DATA, args.arc_items)

    # A measurement takes a function that builds the model, called only when the cache lacks it.
    def perplexity(tag: str, make) -> list[float]:
        key = f"{prefix}|ppl|{tag}|{Path(args.ppl_text).name}|{args.ppl_windows}x{args.ppl_length}"
        return window_nll(cache, key, make, fam, windows, say, tag)

    def choices(tag: str, make, name: str) -> list[float]:
        bench, items = benches[name]
        key = f"{prefix}|{name}|{tag}|{len(items)}"
        return arc_acc_norm(cache, key, make, fam, tokenizer, bench, items,
                            fam.context_length(handle.ckpt.config), say, f"{name} {tag}")

    base_nll = perplexity("base", lambda: base)
    rows = []
    for k in ks:
        for strategy in strategies:
            if strategy == "greedy-loss" and args.search_depth and k > args.search_depth:
                continue  # the rows a shallower search cannot give
            for repair in repairs:
                config = choose(k, strategy, repair)
                tag = "skip" + "_".join(map(str, config["layers"])) + (
                    "-repair" + Path(config["maps"]).stem if config["maps"] else "")
                nll = perplexity(tag, lambda config=config: build(config))
                rows.append({"k": k, "strategy": strategy, "repair": repair, "tag": tag, **config, "nll": nll})

    for row in rows:
        row["ppl"] = ppl(row["nll"])
        row["ppl_retention"] = ppl(base_nll) / row["ppl"]
        row["ppl_ci"] = stats.bootstrap_ci(base_nll, row["nll"], lambda b, c: ppl(b) / ppl(c))

    wanted = set(filter(None, args.arc_for.split(",")))
    for k in ks:
        if f"{k}/best" in wanted:  # the best row of the strategies auto is weighed against, and auto's
            best = max((r for r in rows if r["k"] == k and r["strategy"] != "auto"), key=lambda r: r["ppl_retention"])
            wanted.update({f"{k}/{best['strategy']}/{best['repair']}", f"{k}/auto/linear"})
    arc: dict[str, dict] = {}
    cache_scores: dict[tuple[str, str], list[float]] = {}
    if benches and wanted:  # every retention is against the base, so any measured row needs it
        arc["base"] = {name: choices("base", lambda: base, name) for name in benches}
    for row in rows:
        if wanted & {"all", f"{row['k']}/all", f"{row['k']}/{row['strategy']}/{row['repair']}"}:
            built = []  # the model, built once and only if some benchmark needs it
            make = lambda row=row: built[0] if built else built.append(build(row)) or built[0]  # noqa: E731
            row["arc"] = {}
            for name in benches:
                scores = choices(row["tag"], make, name)
                cache_scores[(row["tag"], name)] = scores
                b = arc["base"][name]
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                row["arc"][name] = {
                    "acc_norm": mean(scores), "retention": mean(scores) / mean(b), "items": len(scores),
                    "ci": stats.bootstrap_ci(b, scores, lambda x, y: mean(y) / mean(x) if mean(x) else math.nan),
                }
            del built

    # the best configuration at each k against plain paper-criterion removal, paired
    comparisons = []
    for k in ks:
        plain = next((r for r in rows if (r["k"], r["strategy"], r["repair"]) == (k, "paper", "none")), None)
        best = max((r for r in rows if r["k"] == k), key=lambda r: r["ppl_retention"])
        if plain is None or best is plain:
            continue
        entry = {"k": k, "best": f"{best['strategy']}/{best['repair']}", "ppl_retention_gain":
                 best["ppl_retention"] - plain["ppl_retention"],
                 "ppl_retention_gain_ci": stats.bootstrap_ci(plain["nll"], best["nll"], lambda a, b, base=base_nll: (
                     ppl(base) / ppl(b) - ppl(base) / ppl(a)))}
        for name in benches:
            if name in plain.get("arc", {}) and name in best.get("arc", {}):
                a, b = cache_scores[(plain["tag"], name)], cache_scores[(best["tag"], name)]
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                entry[f"{name}_acc_norm_gain"] = mean(b) - mean(a)
                entry[f"{name}_acc_norm_gain_ci"] = stats.bootstrap_ci(a, b, lambda x, y: mean(y) - mean(x))
        comparisons.append(entry)
        print(f"k={k}: {entry['best']} against paper/none: " + ", ".join(
            f"{key} {value:+.3f}" if isinstance(value, float) else f"{key} [{value[0]:+.3f}, {value[1]:+.3f}]"
            for key, value in entry.items() if key not in ("k", "best")))

    # auto at each k against the best other row there (by PPL retention), paired
    against_best = []
    for auto_row in (r for r in rows if r["strategy"] == "auto"):
        k = auto_row["k"]
        others = [r for r in rows if r["k"] == k and r["strategy"] != "auto"]
        if not others:
            continue
        best = max(others, key=lambda r: r["ppl_retention"])
        entry = {"k": k, "auto": f"auto/{auto_row['repair']}", "best": f"{best['strategy']}/{best['repair']}",
                 "auto_layers": auto_row["layers"],
                 "best_layers": best["layers"],
                 "ppl_retention_difference": auto_row["ppl_retention"] - best["ppl_retention"],
                 "ppl_retention_difference_ci": stats.bootstrap_ci(best["nll"], auto_row["nll"], lambda a, b, base=base_nll: (
                     ppl(base) / ppl(b) - ppl(base) / ppl(a))),
                 "select_seconds": {"auto": auto_row["select_seconds"], "best": best["select_seconds"]}}
        for name in benches:
            if (auto_row["tag"], name) in cache_scores and (best["tag"], name) in cache_scores:
                a, b = cache_scores[(best["tag"], name)], cache_scores[(auto_row["tag"], name)]
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                entry[f"{name}_acc_norm_difference"] = mean(b) - mean(a)
                entry[f"{name}_acc_norm_difference_ci"] = stats.bootstrap_ci(a, b, lambda x, y: mean(y) - mean(x))
        against_best.append(entry)
        print(f"k={k}: {entry['auto']} {entry['auto_layers']} against the best other row {entry['best']} "
              f"{entry['best_layers']}: "
              + ", ".join(f"{key} {value:+.3f}" if isinstance(value, float) else
                          f"{key} [{value[0]:+.3f}, {value[1]:+.3f}]"
                          for key, value in entry.items() if "difference" in key))

    # the cosine repair against least squares on the same removal, paired
    cosine_against_linear = []
    for row in (r for r in rows if r["repair"] == "cosine"):
        linear = next((r for r in rows if (r["k"], r["strategy"], r["repair"]) == (row["k"], row["strategy"], "linear")),
                      None)
        if linear is None or linear["layers"] != row["layers"]:
            continue
        entry = {"k": row["k"], "strategy": row["strategy"], "layers": row["layers"],
                 "ppl_retention_difference": row["ppl_retention"] - linear["ppl_retention"],
                 "ppl_retention_difference_ci": stats.bootstrap_ci(linear["nll"], row["nll"], lambda a, b: (
                     ppl(base_nll) / ppl(b) - ppl(base_nll) / ppl(a))),
                 "fit_seconds": {"cosine": row["fit_seconds"], "linear": linear["fit_seconds"]}}
        cosine_against_linear.append(entry)
        low, high = entry["ppl_retention_difference_ci"]
        print(f"k={row['k']} {row['strategy']}: cosine against linear, PPL retention "
              f"{entry['ppl_retention_difference']:+.3f} [{low:+.3f}, {high:+.3f}]")

    # --- report ----------------------------------------------------------------------------
    headers = ["k", "strategy", "repair", "removed", "PPL", "PPL ret. [95% CI]", *[
        f"{n} acc_norm ret. [95% CI]" for n in benches], "select s", "fit s"]
    table = []
    for r in rows:
        cells = [r["k"], r["strategy"], r["repair"], ",".join(map(str, r["layers"])), f"{r['ppl']:.2f}",
                 f"{r['ppl_retention']:.3f} [{r['ppl_ci'][0]:.3f}, {r['ppl_ci'][1]:.3f}]"]
        for n in benches:
            a = r.get("arc", {}).get(n)
            cells.append(f"{a['acc_norm']:.3f} -> {a['retention']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"
                         if a else "")
        cells += [f"{r['select_seconds']:.0f}", f"{r['fit_seconds']:.0f}"]
        table.append(cells)
    print(f"base: PPL {ppl(base_nll):.3f}" + "".join(
        f", {n} acc_norm {np.mean(v):.4f} ({len(v)} items)" for n, v in arc.get("base", {}).items()))
    print(_common.table(headers, table))
    print("\n| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers))  # the same, for docs
    for cells in table:
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for r in rows:
        r.pop("nll")
    results_comparisons = comparisons
    settings = {k: v for k, v in vars(args).items() if k not in ("cache", "json")}
    results = {"model": str(model_path), "fingerprint": fingerprint, "base_ppl": ppl(base_nll),
               "base_arc": {n: float(np.mean(v)) for n, v in arc.get("base", {}).items()}, "rows": rows,
               "best_against_paper": results_comparisons, "auto_against_best": against_best,
               "cosine_against_linear": cosine_against_linear}
    print(f"written {_common.write_json(args.json, _common.report('quality', settings, results))}")


if __name__ == "__main__":
    main()
