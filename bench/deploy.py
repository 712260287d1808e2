"""Deploying a pruned model: speed, size and perplexity on each runtime, fp32 and int8.

SmolLM2-135M-Instruct less the layers of --recipe (or plain removal of --remove), side by side in one run on the CPU:

- torch: the pruned safetensors checkpoint in transformers (fp32);
- ort: repskip's ONNX Runtime loop on the pruned ONNX export (repskip.runtime), fp32 and int8
  (`compress --format onnx --quantize int8`);
- genai: onnxruntime-genai on the same two exports (their genai_config.json);
- the full model's int8 export, so that removal + int8 can be read against int8 alone.

Speed: prefill is one forward over --prompt-len tokens (tokens/s = prompt tokens / time);
decode is --decode greedy steps on the cache the prefill left (tokens/s). Medians of
--repeats, every runtime measured in turn within each repeat so outside load hits all alike.
Perplexity: WikiText-2 test, --windows windows of --window tokens, scored by each model
(torch for fp32, repskip's ONNX Runtime loop for int8), with a paired bootstrap 95% interval of
each model's perplexity retention against the full fp32 model's.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

WIKI = _common.REPO.parent / "shared" / "data" / "wikitext2" / "test.txt"


def make_exports(model: Path, recipe: Path, tag: str, root: Path) -> dict[str, Path]:
    """The four folders, made once in ``root`` and reused by later runs of the same recipe."""
    from repskip import pipeline

    out = {"pruned": root / f"pruned-{tag}", "pruned-onnx": root / f"pruned-{tag}-onnx",
           "pruned-onnx-int8": root / f"pruned-{tag}-int8", "full-onnx-int8": root / "full-int8"}
    steps = [(out["pruned"], lambda f: pipeline.compress(model, recipe, f)),
             (out["pruned-onnx"], lambda f: pipeline.compress(model, recipe, f, format="onnx")),
             (out["pruned-onnx-int8"], lambda f: pipeline.compress(model, recipe, f, format="onnx", quantize="int8")),
             (out["full-onnx-int8"], lambda f: pipeline.export_as_is(model, f, quantize="int8"))]
    for folder, make in steps:
        if (folder / ".repskip-output.json").is_file():
            continue
        t = time.perf_counter()
        make(folder)
        print(f"wrote {folder.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def torch_runner(folder: Path, ids: torch.Tensor, steps: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run() -> tuple[float, float]:
        with torch.inference_mode():
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - t
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return prefill, time.perf_counter() - t

    return run


def ort_runner(folder: Path, ids: torch.Tensor, steps: int, threads: int):
    from repskip.checkpoint import read_config
    from repskip.runtime import load_onnx_model

    model = load_onnx_model(folder, read_config(folder), "cpu", threads=threads, spinning=False)

    def run() -> tuple[float, float]:
        t = time.perf_counter()
        out = model(ids)
        prefill = time.perf_counter() - t
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t

    return run, model


def genai_runner(folder: Path, ids: torch.Tensor, steps: int):
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    prompt = ids.numpy().astype(np.int32)

    def run() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + steps + 1, do_sample=False)
        generator = og.Generator(model, params)
        t = time.perf_counter()
        generator.append_tokens(prompt)  # the prompt's forward
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        return prefill, time.perf_counter() - t

    return run


def windows(tokenizer, n: int, width: int) -> list[torch.Tensor]:
    ids = tokenizer(WIKI.read_text("utf-8"), return_tensors="pt").input_ids[0]
    return [ids[i * width:(i + 1) * width].unsqueeze(0) for i in range(n)]


def nll_torch(folder: Path, wins: list[torch.Tensor]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [float(torch.nn.functional.cross_entropy(model(input_ids=w).logits[0, :-1], w[0, 1:], reduction="sum"))
                for w in wins]


def nll_ort(model, wins: list[torch.Tensor]) -> list[float]:
    return [float(torch.nn.functional.cross_entropy(model(w).logits[0, :-1].float(), w[0, 1:], reduction="sum"))
            for w in wins]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--remove", default="20,21,22,23", help="layers removed by plain removal (four, by default)")
    ap.add_argument("--recipe", type=Path, help="a resolved recipe instead of --remove (its repair maps too)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "repskip" / "bench-deploy",
                    help="where the exports are kept between runs")
    ap.add_argument("--exports-only", action="store_true", help="make the exports and stop")
    ap.add_argument("--json", default=_common.default_json("deploy"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from repskip.verify import stats

    model = _common.default_model()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.recipe:  # its repair maps stay beside it; the hash of its text (which holds theirs) names the exports
        recipe = args.recipe
        remove = sorted(yaml.safe_load(recipe.read_text())["resolved"]["remove"])
        tag = hashlib.sha256(recipe.read_bytes()).hexdigest()[:12]
    else:
        remove = [int(x) for x in args.remove.split(",")]
        tag = "-".join(map(str, remove))
        recipe = args.workdir / f"recipe-{tag}.yaml"
        recipe.write_text(f"schema_version: 1\nresolved:\n  remove: {remove}\n")
    folders = make_exports(model, recipe, tag, args.workdir)
    if args.exports_only:
        return
    sizes = {name: sum(f.stat().st_size for f in folder.iterdir()
                       if f.suffix in (".safetensors", ".onnx", ".onnx_data", ".data"))
             for name, folder in folders.items()}

    ids = torch.randint(0, 49152, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ort_fp32, ort_fp32_model = ort_runner(folders["pruned-onnx"], ids, args.decode, args.threads)
    ort_int8, ort_int8_model = ort_runner(folders["pruned-onnx-int8"], ids, args.decode, args.threads)
    runs = {"torch fp32": torch_runner(folders["pruned"], ids, args.decode),
            "ort fp32": ort_fp32, "ort int8": ort_int8,
            "genai fp32": genai_runner(folders["pruned-onnx"], ids, args.decode),
            "genai int8": genai_runner(folders["pruned-onnx-int8"], ids, args.decode)}
    for run in runs.values():  # warm-up
        run()
    times = {name: {"prefill": [], "decode": []} for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            prefill, decode = run()
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
    speed = {name: {"prefill_tokens_per_s": round(args.prompt_len / statistics.median(t["prefill"]), 1),
                    "decode_tokens_per_s": round(args.decode / statistics.median(t["decode"]), 1)}
             for name, t in times.items()}

    tokenizer = AutoTokenizer.from_pretrained(model)
    wins = windows(tokenizer, args.windows, args.window)
    from repskip.checkpoint import read_config
    from repskip.runtime import load_onnx_model

    full_int8 = load_onnx_model(folders["full-onnx-int8"], read_config(folders["full-onnx-int8"]), "cpu",
                                threads=args.threads, spinning=False)
    nll = {"full fp32 (torch)": nll_torch(model, wins), "pruned fp32 (torch)": nll_torch(folders["pruned"], wins),
           "pruned int8 (ort)": nll_ort(ort_int8_model, wins), "full int8 (ort)": nll_ort(full_int8, wins)}
    del ort_fp32_model
    tokens = (args.window - 1) * len(wins)

    def ppl(values: list[float]) -> float:
        return math.exp(sum(values) / (len(values) * (args.window - 1)))

    base = nll["full fp32 (torch)"]
    quality = {}
    for name, values in nll.items():
        lo, hi = stats.bootstrap_ci(base, values, lambda b, c: stats.retention(ppl(b), ppl(c), False))
        quality[name] = {"perplexity": round(ppl(values), 3), "retention": round(stats.retention(ppl(base), ppl(values),
                                                                                                 False), 4),
                         "retention_ci95": [round(lo, 4), round(hi, 4)]}
    print(f"SmolLM2-135M-Instruct less layers {remove}; prompt {args.prompt_len} tokens, {args.decode} decode steps, "
          f"batch 1, {args.threads} threads, median of {args.repeats}")
    print(_common.table(["runtime", "prefill tokens/s", "decode tokens/s"],
                        [[n, s["prefill_tokens_per_s"], s["decode_tokens_per_s"]] for n, s in speed.items()]))
    print(_common.table(["files", "MB"], [[n, f"{b / 1e6:.1f}"] for n, b in sizes.items()]))
    print(f"WikiText-2 test, {len(wins)} x {args.window} tokens ({tokens} scored):")
    print(_common.table(["model", "perplexity", "retention", "95% CI"],
                        [[n, q["perplexity"], q["retention"], f"{q['retention_ci95'][0]} - {q['retention_ci95'][1]}"]
                         for n, q in quality.items()]))
    settings = {"model": str(model), "remove": remove, "recipe": str(args.recipe) if args.recipe else None,
                "recipe_sha256_12": tag if args.recipe else None, "prompt_len": args.prompt_len, "decode": args.decode,
                "repeats": args.repeats, "threads": args.threads, "windows": args.windows, "window": args.window}
    import onnxruntime
    import onnxruntime_genai

    results = {"speed": speed, "seconds": times, "bytes": sizes, "perplexity": quality,
               "runtimes": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__}}
    print(f"results written to {_common.write_json(args.json, _common.report('deploy', settings, results))}")


if __name__ == "__main__":
    main()
