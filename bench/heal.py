"""Plain removal, repaired, and repaired + healed, side by side on the same items.

For SmolLM2-135M-Instruct (or --model): choose k layers with --strategy and fit the linear
repair exactly as a user does (``repskip analyze``, WikiText-2 validation text as
calibration), write the repaired checkpoint (``repskip compress``), heal it (``repskip heal``
with the options below; the exact command is printed and recorded), then measure, against
the full model:

- plain: the same layers removed, no repair (in memory);
- repaired: the compressed checkpoint;
- healed: the healed checkpoint;

on WikiText-2 *test* perplexity (--ppl-windows windows of --ppl-length tokens; retention =
base PPL / PPL) and ARC acc_norm (--arc, the whole test sets unless --arc-items), each with a
95% paired bootstrap interval, and the healed-minus-repaired gain with its own paired
interval. Measurements share quality.py's cache (bench/_measure.py), so a row that bench
already measured is not measured again; outputs live under --work and are reused when
present (delete a folder to redo that stage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _measure import CACHE, Cache, arc_acc_norm, load_arc, ppl, ppl_windows, window_nll  # noqa: E402

DATA = _common.REPO.parent / "shared" / "data"
HEAL_OPTIONS = ("steps", "method", "layers", "around", "rank", "lora_alpha", "lr", "batch_size", "grad_accum",
                "seq_len", "loss", "temperature", "eval_every", "eval_sequences", "warmup")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder [default: SmolLM2-135M-Instruct]")
    p.add_argument("-k", type=int, default=6)
    p.add_argument("--strategy", default="angular-block")
    p.add_argument("--repair", default="linear")
    p.add_argument("--calib", default=str(DATA / "wikitext2" / "valid.txt"))
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--data", default=str(DATA / "wikitext2" / "valid.txt"), help="healing text")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--method", default="lora")
    p.add_argument("--layers", default="around-cuts")
    p.add_argument("--around", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--loss", default="kd")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--ppl-text", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--ppl-windows", type=int, default=32)
    p.add_argument("--ppl-length", type=int, default=256)
    p.add_argument("--arc", default="arc_easy", help="multiple-choice benchmarks ('' for none)")
    p.add_argument("--arc-items", type=int, default=0, help="first N items of each (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "repskip" / "bench-heal"))
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--json", default=_common.default_json("heal"))
    return p.parse_args()


def repskip(*args: str, say) -> float:
    """Run the CLI (the command a user types); returns its wall time."""
    cmd = [str(Path(sys.executable).parent / "repskip"), *map(str, args)]
    say("$ " + shlex.join(["repskip", *map(str, args)]))
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    args = parse()
    import torch
    import yaml

    from repskip import pipeline
    from repskip.verify import stats

    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    model_path = Path(args.model) if args.model else _common.default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / f"run-k{args.k}-{args.strategy}-{args.repair}"
    compressed = work / f"k{args.k}-{args.strategy}-{args.repair}"
    if not (compressed / "config.json").is_file():
        repskip("analyze", model_path, "-o", run_dir, "--strategy", args.strategy, "-k", args.k, "--repair",
                args.repair, "--calib", args.calib, "--num-samples", args.num_samples, "--max-length",
                args.max_length, "--force", say=say)
        repskip("compress", model_path, "--recipe", run_dir / "recipe.yaml", "-o", compressed, "--force", say=say)
    heal_args = {name: getattr(args, name) for name in HEAL_OPTIONS}
    tag = hashlib.sha256(json.dumps({**heal_args, "data": args.data}, sort_keys=True).encode()).hexdigest()[:12]
    healed = work / f"{compressed.name}-healed-{tag}"
    heal_cmd = ["heal", compressed, "--teacher", model_path, "--data", args.data, "-o", healed]
    for name, value in heal_args.items():
        heal_cmd += [f"--{name.replace('_', '-')}", value]
    if args.threads:
        heal_cmd += ["--threads", args.threads]
    if not (healed / "heal.json").is_file():
        repskip(*heal_cmd, "--force", say=say)
    record = json.loads((healed / "heal.json").read_text())

    base_handle = pipeline.open_model(model_path)
    fam = base_handle.family
    fingerprint = base_handle.ckpt.fingerprint()
    removed = yaml.safe_load((compressed / "repskip-recipe.yaml").read_text())["resolved"]["remove"]
    cache = Cache(args.cache)
    prefix = f"{fingerprint[:23]}|{Path(args.calib).name}|{args.num_samples}x{args.max_length}"
    tokenizer = fam.load_tokenizer(base_handle.path)
    windows = ppl_windows(tokenizer, args.ppl_text, args.ppl_windows, args.ppl_length)
    benches = load_arc(args.arc, DATA, args.arc_items)
    context = fam.context_length(base_handle.ckpt.config)

    def models():
        base = base_handle.load("float32")
        yield "base", "base", base
        plain = base_handle.load("float32")
        fam.remove_layers(plain, [i for i in range(base_handle.num_layers) if i not in set(removed)])
        yield "plain", "skip" + "_".join(map(str, removed)), plain
        for name, folder in (("repaired", compressed), ("healed", healed)):
            handle = pipeline.open_model(folder)
            yield name, "ckpt-" + handle.ckpt.fingerprint()[7:23], handle.load("float32")

    scores: dict[str, dict] = {}
    for name, key, model in models():
        model.eval()
        held = lambda m=model: m  # noqa: E731  (built already: these models are measured in turn)
        entry = {"nll": window_nll(cache, f"{prefix}|ppl|{key}|{Path(args.ppl_text).name}|"
                                          f"{args.ppl_windows}x{args.ppl_length}", held, fam, windows, say, name)}
        for bench_name, (bench, items) in benches.items():
            entry[bench_name] = arc_acc_norm(cache, f"{prefix}|{bench_name}|{key}|{len(items)}", held, fam,
                                             tokenizer, bench, items, context, say, f"{bench_name} {name}")
        scores[name] = entry
        del model, held

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = scores["base"]
    rows = []
    for name in ("base", "plain", "repaired", "healed"):
        s = scores[name]
        row = {"model": name, "ppl": ppl(s["nll"]), "ppl_retention": ppl(base["nll"]) / ppl(s["nll"]),
               "ppl_ci": stats.bootstrap_ci(base["nll"], s["nll"], lambda b, c: ppl(b) / ppl(c))}
        for bench_name in benches:
            b, c = base[bench_name], s[bench_name]
            row[bench_name] = {"acc_norm": mean(c), "retention": mean(c) / mean(b), "items": len(c),
                               "ci": stats.bootstrap_ci(b, c, lambda x, y: mean(y) / mean(x))}
        rows.append(row)
    rep, hl = scores["repaired"], scores["healed"]
    gain = {"ppl_retention": ppl(base["nll"]) / ppl(hl["nll"]) - ppl(base["nll"]) / ppl(rep["nll"]),
            "ppl_retention_ci": stats.bootstrap_ci(rep["nll"], hl["nll"], lambda a, b, x=base["nll"]: (
                ppl(x) / ppl(b) - ppl(x) / ppl(a)))}
    for bench_name in benches:
        a, b = rep[bench_name], hl[bench_name]
        gain[f"{bench_name}_acc_norm"] = mean(b) - mean(a)
        gain[f"{bench_name}_acc_norm_ci"] = stats.bootstrap_ci(a, b, lambda x, y: mean(y) - mean(x))

    headers = ["model", "PPL", "PPL ret. [95% CI]", *[f"{n} acc_norm -> ret. [95% CI]" for n in benches]]
    table = []
    for r in rows:
        cells = [r["model"], f"{r['ppl']:.2f}", f"{r['ppl_retention']:.3f} [{r['ppl_ci'][0]:.3f}, {r['ppl_ci'][1]:.3f}]"]
        for n in benches:
            a = r[n]
            cells.append(f"{a['acc_norm']:.4f} -> {a['retention']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]")
        table.append(cells)
    print(_common.table(headers, table))
    print("healed - repaired: " + ", ".join(
        f"{k} {v:+.3f}" if isinstance(v, float) else f"{k} [{v[0]:+.3f}, {v[1]:+.3f}]" for k, v in gain.items()))
    ev = record["history"]["eval"]
    print(f"heal: {record['seconds']:.0f} s training, layers {record['layers']}, "
          f"{record['trainable_parameters']:,} parameters; held-out {ev[0]} -> {ev[-1]}")
    command = shlex.join(["repskip", *map(str, heal_cmd)])
    settings = {k: v for k, v in vars(args).items() if k not in ("cache", "json", "work")}
    results = {"model": str(model_path), "fingerprint": fingerprint, "removed": removed, "heal_command": command,
               "heal_seconds": record["seconds"], "heal_layers": record["layers"],
               "heal_eval": ev, "rows": rows, "healed_minus_repaired": gain}
    print(f"written {_common.write_json(args.json, _common.report('heal', settings, results))}")


if __name__ == "__main__":
    main()
