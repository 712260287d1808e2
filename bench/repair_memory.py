"""Peak memory of the linear-repair fit as the calibration set grows.

Two fits of the same maps, side by side: the run-by-run fit (repskip.repair.fit.fit_linear)
streams the calibration batches once per run and keeps only two hidden x hidden float64 sums
per run, so its memory should not grow with the number of tokens; the two-sweep fit
(repskip.repair.sweep, what analyze runs) keeps every pass's hidden states between layers, in
the model's dtype, so its memory grows with the tokens, by a few copies of [tokens, hidden].
Each --samples value and fit runs the same fit (removing --remove) in its own child process:
the model is loaded, one 8-token forward faults its lazily mapped weights in, the peak is
reset to the current RSS (writing 5 to /proc/self/clear_refs), and the fit runs; the child
reports its peak RSS above the loaded model (getrusage) and the tokens it consumed. The parent
imports no torch (a vfork+exec child starts with its parent's peak). For scale, the table
shows what keeping the fit's inputs (m, y - r) as float64 for every token would take.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _common

NAME = "repair_memory"
DEFAULT_CALIB = _common.REPO.parent / "shared" / "data" / "wikitext2" / "valid.txt"


def child(args: argparse.Namespace) -> dict:
    import torch

    from repskip import pipeline
    from repskip import recipe as R
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    handle = pipeline.open_model(args.model)
    model = handle.load("float32", "cpu")
    removed = [int(x) for x in args.remove.split(",")]
    cal = R.CalibrationSpec(source=args.calib, num_samples=args.child, max_length=args.max_length,
                            batch_size=args.batch_size)
    with torch.inference_mode():
        handle.family.logits(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), torch.ones(1, 8, dtype=torch.long))
    rss_after_load = _common.rss_mb()
    reset = _common.reset_peak_rss()
    t0 = time.perf_counter()
    if args.fit == "sweep":
        fit = pipeline.fit_repair(handle, model, removed, R.SelectionSpec(k=len(removed)), cal)
    else:
        from repskip.repair.fit import fit_linear

        _, batches = pipeline._calibration_batches(handle, cal)
        fit = fit_linear(model, handle.family, batches, pipeline._objective(handle, R.SelectionSpec(k=len(removed)),
                                                                            cal.seed), removed, handle.num_layers)
    return {
        "fit": args.fit,
        "samples": args.child,
        "tokens": fit.tokens,
        "runs": len(fit.runs),
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_reset_after_load": reset,
        "peak_rss_mb": round(_common.peak_rss_mb(), 1),
        "growth_mb": round(_common.peak_rss_mb() - rss_after_load, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "hidden": int(handle.ckpt.config["hidden_size"]),
        "residual": {str(a): round(v, 4) for a, v in fit.residual.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--calib", default=str(DEFAULT_CALIB))
    ap.add_argument("--samples", default="16,64,256", help="calibration sequences per child")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--remove", default="13,14", help="the removed layers (one run: one map)")
    ap.add_argument("--fits", default="runs,sweep", help="which fits: runs (run by run), sweep (two sweeps)")
    ap.add_argument("--json", default=_common.default_json(NAME))
    ap.add_argument("--fit", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    model = args.model or str(_common.default_model())
    common = ["--model", model, "--calib", args.calib, "--max-length", str(args.max_length),
              "--batch-size", str(args.batch_size), "--remove", args.remove]
    runs = []
    for n in [int(x) for x in args.samples.split(",")]:
        for fit in args.fits.split(","):
            print(f"fitting on {n} sequences ({fit}) ...", file=sys.stderr)
            runs.append(_common.run_child(__file__, [*common, "--child", str(n), "--fit", fit]))
    rows = [[r["fit"], r["samples"], r["tokens"], r["rss_after_load_mb"], r["peak_rss_mb"], r["growth_mb"],
             round(r["tokens"] * r["hidden"] * 2 * 8 / 1e6, 1), r["seconds"]] for r in runs]
    print(_common.table(["fit", "sequences", "tokens", "RSS after load MB", "peak RSS MB", "growth MB",
                         "inputs kept, f64 MB", "seconds"], rows))
    settings = {"model": model, "calib": args.calib, "max_length": args.max_length, "batch_size": args.batch_size,
                "remove": args.remove}
    path = _common.write_json(args.json, _common.report(NAME, settings, {"runs": runs}))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
