"""Time of the linear-repair fit against one analysis pass over the same calibration text.

The model is loaded once; the calibration set is the one `repskip analyze` builds with its
defaults (or --calib). Timed, in one process, one after the other and --repeats times each:

  analysis  one statistics pass (repskip.analyze.analysis.collect), as analyze runs it
  runs      the run-by-run fit (repskip.repair.fit.fit_linear): each removed run streams the
            calibration text twice (the full model to the run's end, the pruned one to its
            anchor), then its KL check
  sweep     the two-sweep fit (repskip.repair.sweep, what analyze runs): the full model and
            the pruned one once each, one layer at a time, each map checked at its anchor

The removed layers are block influence's selection (the default before auto) at -k on this
analysis, or --remove. Both fits must give the same maps: the script fails if a map differs.
Reported: the median seconds of each and the ratios fit / analysis (target for the sweep: at
most 3).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common

NAME = "repair_speed"


def tiny_model(folder) -> str:
    """A random Llama-layout checkpoint of 12 layers (hidden 256) with SmolLM2's tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = _common.default_model()
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=12,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the cached SmolLM2-135M-Instruct); 'tiny' for a "
                                    "random 12-layer model")
    ap.add_argument("--calib", help="calibration text (default: analyze's built-in text)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--remove", help="comma-separated layers instead of the default selection")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=_common.default_json(NAME))
    args = ap.parse_args()

    import tempfile

    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from repskip import pipeline
    from repskip import recipe as R
    from repskip.analyze import analysis, calibration
    from repskip.analyze.selection import block_influence, protected_layers
    from repskip.repair.fit import fit_linear
    from repskip.repair.sweep import fit_linear_layerwise

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory()
    model_path = tiny_model(f"{scratch.name}/tiny") if args.model == "tiny" else (args.model or str(_common.default_model()))
    handle = pipeline.open_model(model_path)
    model = handle.load("float32", "cpu")
    cal = R.CalibrationSpec(source=args.calib or "builtin", num_samples=args.num_samples)
    tokenizer = handle.family.load_tokenizer(handle.path)
    calib = calibration.build(tokenizer, cal.source, num_samples=cal.num_samples, max_length=cal.max_length, seed=cal.seed)
    pad = pipeline.pad_id(tokenizer)
    sel = R.SelectionSpec(k=args.k)

    def analyse():
        return analysis.collect(model, handle.family, calib, pad_id=pad, batch_size=cal.batch_size)

    times: dict[str, list[float]] = {"analysis": [], "runs": [], "sweep": []}
    result = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        acc = analyse()
        times["analysis"].append(time.perf_counter() - t)
        if result is None:
            result = analysis.build_result(acc, model_info=handle.info(), calib=calib, settings={}, primary="tokens")
    if args.remove:
        removed = [int(x) for x in args.remove.split(",")]
    else:
        protected = protected_layers(handle.num_layers, True, True, [])
        removed = block_influence(result, args.k, True, protected).remove
    _, batches = pipeline._calibration_batches(handle, cal)
    objective = pipeline._objective(handle, sel, cal.seed)
    fits = {}
    for _ in range(args.repeats):
        for name, fit in (("runs", fit_linear), ("sweep", fit_linear_layerwise)):
            print(f"{name} fit of {removed} ...", file=sys.stderr)
            t = time.perf_counter()
            fits[name] = fit(model, handle.family, batches, objective, removed, handle.num_layers)
            times[name].append(time.perf_counter() - t)
    assert sorted(fits["runs"].maps) == sorted(fits["sweep"].maps), "the two fits kept different maps"
    worst = max((float(np.abs(fits["runs"].maps[a] - fits["sweep"].maps[a]).max()) for a in fits["runs"].maps),
                default=0.0)
    assert worst <= 1e-5, f"the two fits' maps differ by {worst}"
    median = {name: statistics.median(v) for name, v in times.items()}
    rows = [[name, round(median[name], 1), round(median[name] / median["analysis"], 2)] for name in times]
    print(f"{handle.path.name}: {handle.num_layers} layers, remove {removed} ({len(fits['sweep'].runs)} runs), "
          f"{fits['sweep'].tokens} calibration tokens")
    print(_common.table(["pass", "seconds (median)", "x analysis"], rows))
    settings = {"model": "tiny" if args.model == "tiny" else model_path, "calib": args.calib,
                "num_samples": args.num_samples, "k": args.k, "repeats": args.repeats}
    results = {"removed": removed, "runs": len(fits["sweep"].runs), "tokens": fits["sweep"].tokens,
               "seconds": times, "median": median, "max_map_difference": worst,
               "kept_maps": sorted(fits["sweep"].maps)}
    path = _common.write_json(args.json, _common.report(NAME, settings, results))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
