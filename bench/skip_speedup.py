"""Realised speedup of removing k layers against the FLOPs-ideal speedup.

Model: SmolLM2-135M-Instruct's weights in LLaDA's layout (a diffusion model's denoising
step is one full-sequence forward), and the same model as a transformers Llama (the AR
prefill). For each, one forward over --seq-len tokens is timed for the full model and for
the model with --remove layers removed in memory (median of --repeats after a warm-up); the
ideal speedup is base FLOPs / pruned FLOPs from repskip's analytic count (LM head
included). Target: realised / ideal >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common  # noqa: E402
from helpers import llada_from_llama  # noqa: E402


def timed_pair(base, pruned, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately so outside load hits both alike."""
    base(), pruned()  # warm-up: pages the lazily mapped weights in
    times: dict[str, list[float]] = {"base": [], "pruned": []}
    for _ in range(repeats):
        for name, fn in (("base", base), ("pruned", pruned)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return statistics.median(times["base"]), statistics.median(times["pruned"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remove", default="3,6,9,12,15,18", help="layers to remove (k=6 by default)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=_common.default_json("skip_speedup"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from repskip.flops import forward_flops
    from repskip.pipeline import open_model

    removed = [int(x) for x in args.remove.split(",")]
    smol = _common.default_model()
    llada = llada_from_llama(smol, Path(tempfile.mkdtemp(prefix="bench-skip-")) / "smol-llada")
    ids = torch.randint(0, 40000, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows, results = [], {}
    for label, path in (("llada (diffusion step)", llada), ("llama (AR prefill)", smol)):
        handle = open_model(path)
        fam = handle.family
        cost = fam.cost(handle.ckpt.config)
        kept = [i for i in range(cost.num_layers) if i not in removed]
        ideal = forward_flops(cost, args.seq_len).total / forward_flops(cost, args.seq_len, layers=kept).total
        with torch.inference_mode():
            full = fam.load(path, dtype=torch.float32)
            cut = fam.load(path, dtype=torch.float32)
            fam.remove_layers(cut, kept)
            mask = torch.ones_like(ids)
            base, pruned = timed_pair(lambda: fam.logits(full, ids, mask), lambda: fam.logits(cut, ids, mask), args.repeats)
        realised = base / pruned
        results[label] = {"base_s": round(base, 4), "pruned_s": round(pruned, 4), "realised_speedup": round(realised, 4),
                          "ideal_speedup": round(ideal, 4), "realised_over_ideal": round(realised / ideal, 3)}
        rows.append([label, f"{base * 1000:.0f}", f"{pruned * 1000:.0f}", f"{realised:.3f}", f"{ideal:.3f}",
                     f"{realised / ideal:.3f}"])
    print(_common.table(["model", "base ms", "pruned ms", "realised", "FLOPs-ideal", "realised/ideal"], rows))
    data = _common.report("skip_speedup", {"removed": removed, "seq_len": args.seq_len, "batch": args.batch,
                                           "repeats": args.repeats, "threads": args.threads, "dtype": "float32"}, results)
    print(f"wrote {_common.write_json(args.json, data)}")


if __name__ == "__main__":
    main()
