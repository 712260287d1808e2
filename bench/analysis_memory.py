"""Peak memory of repskip's streaming analysis against collecting every hidden state.

Each variant runs in its own child process, so that peaks never mix:

  streaming    repskip.analyze.analysis.collect(...) with default settings; the per-layer mean
               cosine cos(h_l, h_l+1) over all real tokens is read from its sums
  collect-all  the naive approach: forward hooks keep the hidden states h_0 .. h_L of every
               batch (real tokens only, in the model's dtype) in Python lists, and the same
               per-layer mean cosine is computed from them at the end. h_0 is layer 0's input
               and h_l+1 layer l's output (layer l+1's input is the same tensor, so it is
               kept once): L+1 states per token, like output_hidden_states.

Inside a child: the model is loaded, the calibration set built and one 8-token forward run
(transformers maps fp32 safetensors weights into memory lazily: without it the first pass
would page in the whole model and count it as analysis memory), the current RSS is read
(VmRSS, "after load"), and the peak is then reset to it (writing 5 to /proc/self/clear_refs)
so that getrusage(RUSAGE_SELF).ru_maxrss measures the variant alone and not the transient
peak of loading the weights; that load-time peak is reported as well. The parent imports no
torch: a vfork+exec child starts with ru_maxrss equal to its parent's peak.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common

NAME = "analysis_memory"
VARIANTS = ("streaming", "collect-all")
DEFAULT_CALIB = _common.REPO.parent / "shared" / "data" / "wikitext2" / "test.txt"


def child(args: argparse.Namespace) -> dict:
    rss_start = _common.rss_mb()
    import torch
    from repskip import pipeline
    from repskip.analyze import analysis
    from repskip.analyze import calibration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    handle = pipeline.open_model(args.model)
    family = handle.family
    model = family.load(handle.path, pipeline.parse_dtype(args.dtype), "cpu")
    tokenizer = family.load_tokenizer(handle.path)
    calib = calibration.build(tokenizer, args.calib, num_samples=args.num_samples, max_length=args.max_length)
    pad_id = pipeline.pad_id(tokenizer)
    layers = family.decoder_layers(model)
    L = len(layers)
    with torch.inference_mode():  # fault in the weights: transformers mmaps safetensors
        family.logits(model, torch.tensor([calib.sequences[0][:8]]), torch.ones(1, len(calib.sequences[0][:8])))
    rss_after_load = _common.rss_mb()
    parts_after_load = _common.rss_parts_mb()
    peak_load = _common.peak_rss_mb()
    reset = _common.reset_peak_rss()

    t0 = time.perf_counter()
    if args.child == "streaming":
        acc = analysis.collect(model, family, calib, pad_id=pad_id, batch_size=args.batch_size)
        cosine = [row["cosine_mean"] for row in acc.group_result("tokens")["layers"]]
        stored_bytes = 0
    else:
        states: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
        current: dict[str, torch.Tensor] = {}

        class Stop(Exception):
            pass

        def make_hook(i: int):
            def hook(module, hargs, kwargs, output):
                valid = current["valid"]
                if i == 0:
                    h_in = hargs[0] if hargs else kwargs["hidden_states"]
                    states[0].append(h_in[valid])  # boolean indexing copies
                states[i + 1].append(family.layer_output(output)[valid])
                if i == L - 1:
                    raise Stop

            return hook

        hooks = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        with torch.inference_mode():
            for ids, mask in calibration.batches(calib.sequences, args.batch_size, pad_id):
                current["valid"] = mask.bool()
                try:
                    family.logits(model, ids, mask)
                except Stop:
                    pass
            for h in hooks:
                h.remove()
            stored_bytes = sum(t.numel() * t.element_size() for s in states for t in s)

            def unit(x: torch.Tensor) -> torch.Tensor:
                x = x.float()
                return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

            cosine = []
            for layer in range(L):
                total, count = torch.zeros((), dtype=torch.float64), 0
                for a, b in zip(states[layer], states[layer + 1]):
                    cos = (unit(a) * unit(b)).sum(-1).clamp(-1.0, 1.0).double()
                    total += cos.sum()
                    count += cos.numel()
                cosine.append(float(total / count))
    seconds = time.perf_counter() - t0
    return {
        "variant": args.child,
        "rss_start_mb": round(rss_start, 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_during_load_mb": round(peak_load, 1),
        "peak_reset_after_load": reset,
        "peak_rss_mb": round(_common.peak_rss_mb(), 1),
        "rss_parts_after_load_mb": parts_after_load,
        "rss_parts_end_mb": _common.rss_parts_mb(),
        "seconds": round(seconds, 2),
        "stored_state_bytes": stored_bytes,
        "calib": calib.describe(),
        "sequences": len(calib.sequences),
        "tokens": calib.tokens,
        "num_layers": L,
        "hidden": int(handle.ckpt.config["hidden_size"]),
        "dtype_bytes": next(model.parameters()).element_size(),
        "cosine": cosine,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--calib", default=str(DEFAULT_CALIB), help="a .txt (blank-line paragraphs) or .jsonl file")
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", default=_common.default_json(NAME))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(__import__("json").dumps(child(args)))
        return

    model = args.model or str(_common.default_model())
    common = ["--model", model, "--calib", args.calib, "--num-samples", str(args.num_samples),
              "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--dtype", args.dtype]
    runs = {}
    for variant in VARIANTS:
        print(f"running {variant} ...", file=sys.stderr)
        runs[variant] = _common.run_child(__file__, [*common, "--child", variant])

    s, c = runs["streaming"], runs["collect-all"]
    diff = max(abs(a - b) for a, b in zip(s["cosine"], c["cosine"]))
    analytic = s["tokens"] * (s["num_layers"] + 1) * s["hidden"] * s["dtype_bytes"]
    for r in runs.values():
        r["growth_mb"] = round(r["peak_rss_mb"] - r["rss_after_load_mb"], 1)
    ratios = {
        "peak_rss collect-all/streaming": round(c["peak_rss_mb"] / s["peak_rss_mb"], 2),
        "growth collect-all/streaming": round(c["growth_mb"] / max(s["growth_mb"], 1e-9), 1),
    }
    rows = [
        [v, r["rss_after_load_mb"], r["peak_rss_mb"], r["growth_mb"], r["peak_during_load_mb"], r["seconds"]]
        for v, r in runs.items()
    ]
    print(f"\n{s['sequences']} sequences, {s['tokens']} tokens (max length {args.max_length}), "
          f"{s['num_layers']} layers x {s['hidden']} hidden, {args.dtype}, batch {args.batch_size}")
    print(_common.table(["variant", "RSS after load MB", "peak RSS MB", "growth MB", "load peak MB", "seconds"], rows))
    print(f"\nall states, analytic: tokens x (layers+1) x hidden x bytes = {analytic / 1e6:.1f} MB "
          f"(collect-all kept {c['stored_state_bytes'] / 1e6:.1f} MB)")
    for k, v in ratios.items():
        print(f"ratio {k}: {v}")
    print(f"per-layer mean cosine, max |streaming - collect-all| = {diff:.2e}")

    settings = {"model": model, "calib": s["calib"],
                "num_samples": args.num_samples, "max_length": args.max_length,
                "batch_size": args.batch_size, "dtype": args.dtype}
    results = {"variants": runs, "analytic_all_states_bytes": analytic, "ratios": ratios,
               "cosine_max_abs_diff": diff}
    path = _common.write_json(args.json, _common.report(NAME, settings, results))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
