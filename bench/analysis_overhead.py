"""Time of repskip's streaming statistics pass against plain forward passes.

The model (SmolLM2-135M-Instruct by default) is loaded once through its family and the
calibration set is built once. On the very same batches (repskip.analyze.calibration.batches) three
things are timed, each a full pass over the calibration set:

  full      family.logits(model, ids, mask) under torch.inference_mode (through the LM head)
  stopped   the same forward, stopped by a hook on the last decoder layer that raises, as
            repskip.analyze.analysis does with _StopForward, and no statistics: the like-for-like
            baseline, since the analysis never runs the final norm and LM head either
  analysis  repskip.analyze.analysis.collect(...) with its default settings

Each kind runs batch by batch: for every batch the three kinds run one after the other
(interleaved, the order rotating from round to round, so that drifting machine load hits all
three alike); analysis runs collect on a calibration set holding just that batch's sequences,
which calibration.batches turns back into the identical padded batch. One warm-up round, then
--repeats rounds. Reported per kind: minimum and median of the per-round totals (seconds of
one whole pass), the sum over batches of each batch's minimum over the rounds (the most
noise-proof estimate of an undisturbed pass on a shared machine), and the process CPU time;
and the ratios analysis/stopped and analysis/full of each. Project target: analysis/stopped
<= 1.15.
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
    from repskip import pipeline
    from repskip.analyze import analysis
    from repskip.analyze import calibration
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
    pad_id = pipeline.pad_id(tokenizer)
    last_layer = family.decoder_layers(model)[-1]
    # The batches repskip makes, each kept as its list of sequences: run alone through
    # calibration.batches (or collect) a chunk gives back exactly the same padded batch.
    chunks = [[ids[r, : int(mask[r].sum())].tolist() for r in range(ids.shape[0])]
              for ids, mask in calibration.batches(calib.sequences, args.batch_size, pad_id)]

    def stop(module, inputs, output):
        raise _Stop

    @torch.inference_mode()
    def forward(chunk: list[list[int]], stopped: bool) -> None:
        hook = last_layer.register_forward_hook(stop) if stopped else None
        try:
            for ids, mask in calibration.batches(chunk, args.batch_size, pad_id):
                try:
                    family.logits(model, ids, mask)
                except _Stop:
                    pass
        finally:
            if hook is not None:
                hook.remove()

    runners = {
        "full": lambda chunk: forward(chunk, stopped=False),
        "stopped": lambda chunk: forward(chunk, stopped=True),
        "analysis": lambda chunk: analysis.collect(
            model, family, calibration.CalibrationSet(calib.source, chunk, calib.max_length),
            pad_id=pad_id, batch_size=args.batch_size),
    }
    # wall[kind][round][batch] and cpu[kind][round][batch]; round 0 is the warm-up.
    wall = {k: [[0.0] * len(chunks) for _ in range(args.repeats + 1)] for k in KINDS}
    cpu = {k: [[0.0] * len(chunks) for _ in range(args.repeats + 1)] for k in KINDS}
    for r in range(args.repeats + 1):
        for b, chunk in enumerate(chunks):
            for kind in KINDS[r % 3:] + KINDS[: r % 3]:  # rotate the order from round to round
                t0, c0 = time.perf_counter(), time.process_time()
                runners[kind](chunk)
                wall[kind][r][b], cpu[kind][r][b] = time.perf_counter() - t0, time.process_time() - c0
        label = "warm-up" if r == 0 else f"round {r}/{args.repeats}"
        print(f"{label:>12}  " + "  ".join(f"{k} {sum(wall[k][r]):7.2f} s" for k in KINDS), file=sys.stderr)

    def stats(kind: str) -> dict:
        totals = [sum(x) for x in wall[kind][1:]]
        per_batch_min = [min(wall[kind][r][b] for r in range(1, args.repeats + 1)) for b in range(len(chunks))]
        return {"min_s": round(min(totals), 3), "median_s": round(statistics.median(totals), 3),
                "sum_batch_min_s": round(sum(per_batch_min), 3), "cpu_min_s": round(min(sum(x) for x in cpu[kind][1:]), 3),
                "rounds_s": [round(t, 3) for t in totals], "warmup_s": round(sum(wall[kind][0]), 3),
                "batches_s": [[round(t, 4) for t in x] for x in wall[kind][1:]]}

    summary = {k: stats(k) for k in KINDS}
    ratios = {}
    for stat in ("min_s", "median_s", "sum_batch_min_s", "cpu_min_s"):
        for base in ("stopped", "full"):
            ratios[f"analysis/{base} ({stat[:-2]})"] = round(summary["analysis"][stat] / summary[base][stat], 3)
    target_ok = ratios["analysis/stopped (min)"] <= TARGET
    robust_ok = ratios["analysis/stopped (sum_batch_min)"] <= TARGET

    print(f"\n{len(calib.sequences)} sequences in {len(chunks)} batches of {args.batch_size}, {calib.tokens} tokens, "
          f"{args.dtype}, {torch.get_num_threads()} threads, {args.repeats} rounds after a warm-up")
    print(_common.table(["pass", "min s", "median s", "sum of batch minima s", "cpu min s"],
                        [[k, f"{v['min_s']:.2f}", f"{v['median_s']:.2f}", f"{v['sum_batch_min_s']:.2f}",
                          f"{v['cpu_min_s']:.2f}"] for k, v in summary.items()]))
    print()
    print(_common.table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios.items()]))
    print(f"\ntarget analysis/stopped <= {TARGET}: {'holds' if target_ok else 'MISSED'} on the minima, "
          f"{'holds' if robust_ok else 'MISSED'} on the sums of per-batch minima")

    settings = {
        "model": str(handle.path), "calib": calib.describe(), "batch_size": args.batch_size,
        "dtype": args.dtype, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "analysis_defaults": {"positions": "all", "max_distance": 64},
    }
    results = {"times": summary, "ratios": ratios,
               "target": {"analysis/stopped <=": TARGET, "holds_min": target_ok, "holds_sum_batch_min": robust_ok}}
    path = _common.write_json(args.json, _common.report(NAME, settings, results))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
