"""Time of repskip's streaming statistics pass against plain forward passes.

The model (SmolLM2-135M-Instruct by default) is loaded once through its family and the
calibration set is built once. On the very same batches (repskip.calibration.batches) three
things are timed, each a full pass over the calibration set:

  full      family.logits(model, ids, mask) under torch.inference_mode (through the LM head)
  stopped   the same forward, stopped by a hook on the last decoder layer that raises, as
            repskip.analysis does with _StopForward, and no statistics: the like-for-like
            baseline, since the analysis never runs the final norm and LM head either
  analysis  repskip.analysis.collect(...) with its default settings

After one warm-up round, --repeats rounds run the three kinds one after the other
(interleaved, so that drifting machine load hits all three alike). Reported: minimum and
median seconds, and the ratios analysis/stopped and analysis/full of the minima (and of the
medians). Project target: analysis/stopped <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _common

NAME = "analysis_overhead"
TARGET = 1.15
KINDS = ("full", "stopped", "analysis")


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--calib", default="builtin", help="'builtin' or a .txt / .jsonl file")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", default=_common.default_json(NAME))
    args = ap.parse_args()

    import torch
    from repskip import analysis, calibration, pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else _common.default_model()
    handle = pipeline.open_model(model_path)
    family = handle.family
    model = family.load(handle.path, pipeline.parse_dtype(args.dtype), "cpu")
    tokenizer = family.load_tokenizer(handle.path)
    calib = calibration.build(
        tokenizer, args.calib, num_samples=args.num_samples, max_length=args.max_length
    )
    pad_id = pipeline._pad_id(tokenizer)
    last_layer = family.decoder_layers(model)[-1]

    def batches():
        return calibration.batches(calib.sequences, args.batch_size, pad_id)

    @torch.inference_mode()
    def run_full() -> None:
        for ids, mask in batches():
            family.logits(model, ids, mask)

    @torch.inference_mode()
    def run_stopped() -> None:
        def stop(module, inputs, output):
            raise _Stop

        handle_ = last_layer.register_forward_hook(stop)
        try:
            for ids, mask in batches():
                try:
                    family.logits(model, ids, mask)
                except _Stop:
                    pass
        finally:
            handle_.remove()

    def run_analysis() -> None:
        analysis.collect(model, family, calib, pad_id=pad_id, batch_size=args.batch_size)

    runners = {"full": run_full, "stopped": run_stopped, "analysis": run_analysis}
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for round_ in range(args.repeats + 1):
        label = "warm-up" if round_ == 0 else f"round {round_}/{args.repeats}"
        for kind in KINDS:
            t0 = time.perf_counter()
            runners[kind]()
            dt = time.perf_counter() - t0
            print(f"{label:>12}  {kind:<8}  {dt:8.2f} s", file=sys.stderr)
            if round_ > 0:
                times[kind].append(dt)

    summary = {
        k: {"min_s": round(min(v), 4), "median_s": round(statistics.median(v), 4), "all_s": [round(x, 4) for x in v]}
        for k, v in times.items()
    }
    ratios = {
        "analysis/stopped (min)": summary["analysis"]["min_s"] / summary["stopped"]["min_s"],
        "analysis/full (min)": summary["analysis"]["min_s"] / summary["full"]["min_s"],
        "analysis/stopped (median)": summary["analysis"]["median_s"] / summary["stopped"]["median_s"],
        "analysis/full (median)": summary["analysis"]["median_s"] / summary["full"]["median_s"],
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    target_ok = ratios["analysis/stopped (min)"] <= TARGET

    rows = [[k, f"{summary[k]['min_s']:.2f}", f"{summary[k]['median_s']:.2f}"] for k in KINDS]
    print(f"\n{calib.describe()['sequences']} sequences, {calib.tokens} tokens, batch {args.batch_size}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(_common.table(["pass", "min s", "median s"], rows))
    print()
    print(_common.table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios.items()]))
    print(f"\ntarget analysis/stopped <= {TARGET}: {'holds' if target_ok else 'MISSED'}")

    settings = {
        "model": str(handle.path), "calib": calib.describe(), "batch_size": args.batch_size,
        "dtype": args.dtype, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "analysis_defaults": {"positions": "all", "max_distance": 64},
    }
    results = {"times": summary, "ratios": ratios, "target": {"analysis/stopped (min) <=": TARGET, "holds": target_ok}}
    path = _common.write_json(args.json, _common.report(NAME, settings, results))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
