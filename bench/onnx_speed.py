"""ONNX export of SmolLM2-135M-Instruct: file size, ONNX Runtime against PyTorch, and the
realised speedup of the pruned graph against the FLOPs-ideal speedup.

Three models, all fp32 on the CPU with the same thread count:
- PyTorch: transformers' LlamaForCausalLM with --remove layers removed in memory;
- ORT pruned: `repskip compress --format onnx` with the same layers removed;
- ORT full: the same export with no layer removed.
Prefill is one forward over --prompt-len tokens; decode is --decode single-token steps on the
KV cache that prefill left (ms per token). Medians of --repeats, measured in alternation so
outside load hits every model alike. Targets: ORT / PyTorch >= 1.0 for prefill and decode;
(ORT full / ORT pruned) / FLOPs-ideal >= 0.9. The file-size target: the pruned file is
smaller than the full one by at least 90% of the removed layers' share of the parameters.
ONNX Runtime's worker threads are told not to spin after a run (by default they busy-wait
for more work, which would slow whatever is timed next in the alternation).
With --fused, a copy of the pruned graph with ONNX Runtime's transformer fusions
(onnxruntime.transformers.optimizer, model type qwen3: RMSNorm and skip-add fusions) is
timed as well.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def export(model: Path, remove: list[int], out: Path) -> Path:
    """The ONNX export of ``model`` without ``remove``, made once and reused."""
    from repskip import pipeline

    if (out / "model.onnx").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(f"schema_version: 1\nresolved:\n  remove: {remove}\n")
    t = time.perf_counter()
    pipeline.compress(model, recipe, out, format="onnx", force=True)
    print(f"exported {out.name} in {time.perf_counter() - t:.0f} s")
    return out


def fused_copy(src: Path, out: Path) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    if (out / "model.onnx").is_file():
        return out
    cfg = json.loads((src / "config.json").read_text())
    opt = optimize_model(str(src / "model.onnx"), model_type="qwen3", num_heads=cfg["num_attention_heads"],
                         hidden_size=cfg["hidden_size"], opt_level=0)
    print("fusions:", {k: v for k, v in opt.get_fused_operator_statistics().items() if v})
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.onnx":
            shutil.copy(f, out / f.name)
    opt.save_model_to_file(str(out / "model.onnx"))
    return out


def sync() -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def runners(model, ids: torch.Tensor, steps: int, onnx: bool):
    """(prefill, decode) callables: one forward over ``ids``; ``steps`` cached decode steps."""
    token = ids[:, -1:]

    def prefill():
        out = model(ids) if onnx else model(input_ids=ids, use_cache=True)
        sync()
        return out

    state = {"past": prefill().past_key_values}

    def decode():
        past = state["past"]
        if not onnx:  # transformers' cache grows in place: start each run from a fresh copy
            import copy

            past = copy.deepcopy(past)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past) if onnx else model(input_ids=token, past_key_values=past,
                                                                          use_cache=True)
            past = out.past_key_values
        sync()
        return time.perf_counter() - t

    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remove", default="3,6,9,12,15,18", help="layers to remove (k=6 by default)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per repeat")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "repskip" / "bench-onnx",
                    help="where the exports are kept between runs")
    ap.add_argument("--fused", action="store_true", help="also time ORT's transformer fusions")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: PyTorch on the GPU against ORT's CUDAExecutionProvider (needs onnxruntime-gpu)")
    ap.add_argument("--json", default=_common.default_json("onnx_speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from repskip.flops import forward_flops
    from repskip.pipeline import open_model
    from repskip.checkpoint import read_config
    from repskip.runtime import load_onnx_model

    removed = [int(x) for x in args.remove.split(",")]
    smol = _common.default_model()
    tag = "_".join(map(str, removed))
    pruned_dir = export(smol, removed, args.workdir / f"smollm2-skip{tag}-onnx")
    full_dir = export(smol, [], args.workdir / "smollm2-full-onnx")

    handle = open_model(smol)
    cost = handle.family.cost(handle.ckpt.config)
    kept = [i for i in range(handle.num_layers) if i not in removed]
    layer_params = sum(e.nbytes for n, e in handle.ckpt.tensors.items() if n.startswith("model.layers."))
    removed_share = layer_params * len(removed) / handle.num_layers / handle.ckpt.total_bytes
    size_full = (full_dir / "model.onnx").stat().st_size
    size_pruned = (pruned_dir / "model.onnx").stat().st_size
    shrink = (size_full - size_pruned) / size_full
    size = {"full_bytes": size_full, "pruned_bytes": size_pruned, "shrink": round(shrink, 4),
            "removed_param_share": round(removed_share, 4), "shrink_over_share": round(shrink / removed_share, 4)}
    print(_common.table(["full MB", "pruned MB", "shrink", "removed params' share", "shrink / share"],
                        [[f"{size_full / 1e6:.1f}", f"{size_pruned / 1e6:.1f}", f"{shrink:.2%}", f"{removed_share:.2%}",
                          f"{shrink / removed_share:.3f}"]]))

    ids = torch.randint(0, handle.family.vocab_size(handle.ckpt.config), (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    with torch.inference_mode():
        pt = handle.family.load(smol, torch.float32, args.device)
        handle.family.remove_layers(pt, kept)
        models = {"pytorch pruned": (pt, False),
                  "ort pruned": (load_onnx_model(pruned_dir, read_config(pruned_dir), args.device, threads=args.threads, spinning=False), True),
                  "ort full": (load_onnx_model(full_dir, read_config(full_dir), args.device, threads=args.threads, spinning=False), True)}
        if args.fused:
            fused = fused_copy(pruned_dir, args.workdir / f"smollm2-skip{tag}-onnx-fused")
            models["ort pruned fused"] = (load_onnx_model(fused, read_config(fused), args.device, threads=args.threads, spinning=False), True)
        run = {name: runners(m, ids, args.decode, onnx) for name, (m, onnx) in models.items()}
        for prefill, decode in run.values():  # warm-up: page the weights in, let ORT settle its plans
            prefill(), decode()
        times = {name: {"prefill": [], "decode": []} for name in run}
        for _ in range(args.repeats):
            for name, (prefill, decode) in run.items():
                t = time.perf_counter()
                prefill()
                times[name]["prefill"].append(time.perf_counter() - t)
                times[name]["decode"].append(decode() / args.decode)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    context = args.prompt_len + args.decode // 2
    ideal = {
        "prefill": forward_flops(cost, args.prompt_len).total / forward_flops(cost, args.prompt_len, layers=kept).total,
        "decode": forward_flops(cost, 1, context).total / forward_flops(cost, 1, context, layers=kept).total,
    }
    results: dict = {"size": size, "median_s": {n: {k: round(v, 5) for k, v in m.items()} for n, m in med.items()},
                     "decode_tokens_per_s": {n: round(args.batch / m["decode"], 1) for n, m in med.items()}}
    rows = []
    for phase in ("prefill", "decode"):
        ort_vs_pt = med["pytorch pruned"][phase] / med["ort pruned"][phase]
        realised = med["ort full"][phase] / med["ort pruned"][phase]
        results[phase] = {"ort_over_pytorch": round(ort_vs_pt, 3), "realised_speedup": round(realised, 4),
                          "ideal_speedup": round(ideal[phase], 4), "realised_over_ideal": round(realised / ideal[phase], 3)}
        if args.fused:
            results[phase]["fused_over_unfused"] = round(med["ort pruned"][phase] / med["ort pruned fused"][phase], 3)
        unit = "ms" if phase == "prefill" else "ms/token"
        rows.append([f"{phase} ({unit})", f"{med['pytorch pruned'][phase] * 1e3:.1f}", f"{med['ort pruned'][phase] * 1e3:.1f}",
                     f"{ort_vs_pt:.3f}", f"{med['ort full'][phase] * 1e3:.1f}", f"{realised:.3f}", f"{ideal[phase]:.3f}",
                     f"{realised / ideal[phase]:.3f}"]
                    + ([f"{med['ort pruned fused'][phase] * 1e3:.1f}"] if args.fused else []))
    print(_common.table(["phase", "PyTorch pruned", "ORT pruned", "ORT/PyTorch", "ORT full", "full/pruned",
                         "FLOPs-ideal", "realised/ideal"] + (["ORT pruned fused"] if args.fused else []), rows))
    data = _common.report("onnx_speed", {"removed": removed, "prompt_len": args.prompt_len, "decode_steps": args.decode,
                                         "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
                                         "dtype": "float32", "device": args.device,
                                         "provider": f"{args.device.upper()}ExecutionProvider"}, results)
    print(f"wrote {_common.write_json(args.json, data)}")


if __name__ == "__main__":
    main()
