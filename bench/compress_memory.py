"""Peak memory and throughput of repskip's compress against a plain file copy.

1. A child re-saves the model (default SmolLM2-135M-Instruct, a single model.safetensors) as a
   multi-shard checkpoint with the safetensors library: tensors in file order, a new shard when
   the next tensor would pass --shard-size (a larger tensor gets its own), plus the index.
2. Plain copy "before": shutil.copyfile of every input shard into a fresh folder, once.
3. A fresh child imports repskip, reads its RSS ("after imports"), then runs
   repskip.pipeline.compress with a resolved recipe removing --remove, max_shard_size = the
   input's shard size. Reported: the absolute peak RSS of the child (ru_maxrss), the peak of
   the call alone (peak reset with /proc/self/clear_refs after the imports), the call's wall
   time, the time inside repskip.compress.files.write_pruned (the file work without the call's fixed
   costs), and the weight-file bytes written, hence MB/s.
4. Plain copy "after", and the same with an fsync per file (compress fsyncs every shard, so
   that is the like-for-like copy). The page cache cannot be dropped here: the copies before
   and after show how much caching moves the figure.
Steps 3-4 run --repeats times (min and median; the highest peak); each timed run starts after
an untimed os.sync(), so no run pays for the write-back of the previous one's dirty pages.

Targets: peak RSS <= largest input shard x 1.25; compress MB/s >= 0.5 x plain copy. A full
load needs at least the total tensor bytes, shown against the same budget. The parent imports
no torch: a vfork+exec child starts with ru_maxrss equal to its parent's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import _common

NAME = "compress_memory"
MB = 1e6
INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def build_sharded(args: argparse.Namespace) -> dict:
    """Child: re-save the model's weights as shards of at most --shard-size bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst, shard_bytes = Path(args.model), Path(args.output), int(args.shard_size)
    src_file = src / "model.safetensors"
    with open(src_file, "rb") as fh:  # the header gives tensor sizes in file order
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    header.pop("__metadata__", None)
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
        begin, end = header[name]["data_offsets"]
        if groups[-1] and size + end - begin > shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += end - begin
    dst.mkdir(parents=True)
    weight_map = {}
    with safe_open(str(src_file), framework="pt") as f:
        for i, names in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: f.get_tensor(n) for n in names}, str(dst / shard), metadata={"format": "pt"})
            weight_map.update({n: shard for n in names})
    total = sum(end - begin for begin, end in (h["data_offsets"] for h in header.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
            shutil.copy2(item, dst / item.name)
    return {"shards": len(groups)}


def compress_child(args: argparse.Namespace) -> dict:
    rss_start = _common.rss_mb()
    from repskip import pipeline, recipe
    from repskip.checkpoint import open_checkpoint
    from repskip.compress.files import parse_size

    rss_imports = _common.rss_mb()
    peak_imports = _common.peak_rss_mb()
    remove = [int(x) for x in args.remove.split(",")]
    rec = recipe.Recipe(resolved=recipe.Resolved(remove=remove))
    write_s = []  # time inside repskip.compress.files.write_pruned, the file work proper

    def timed_write(*a, **k):
        t = time.perf_counter()
        res = write_pruned(*a, **k)
        write_s.append(time.perf_counter() - t)
        return res

    write_pruned, pipeline.write_pruned = pipeline.write_pruned, timed_write
    reset = _common.reset_peak_rss()
    t0 = time.perf_counter()
    result, _ = pipeline.compress(args.input, rec, args.output, max_shard_size=parse_size(args.shard_size))
    seconds = time.perf_counter() - t0
    peak_call = _common.peak_rss_mb()  # since the reset: the compress call alone
    out = open_checkpoint(args.output)  # sanity check of what was written (headers only)
    files = weight_files(Path(args.output))
    return {
        "rss_start_mb": round(rss_start, 1), "rss_after_imports_mb": round(rss_imports, 1),
        "peak_during_imports_mb": round(peak_imports, 1), "peak_reset_after_imports": reset,
        "peak_compress_call_mb": round(peak_call, 1), "peak_rss_mb": round(max(peak_imports, peak_call), 1),
        "seconds": round(seconds, 3), "write_pruned_s": round(write_s[0], 3), "shards": result.shards,
        "bytes_in": result.bytes_in, "tensor_bytes_out": result.bytes_out,
        "file_bytes_out": sum(f.stat().st_size for f in files), "largest_output_shard": max(f.stat().st_size for f in files),
        "layers_out": out.config["num_hidden_layers"], "tensors_out": len(out.tensors),
    }


def plain_copy(files: list[Path], dst: Path, fsync: bool) -> float:
    os.sync()
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
        if fsync:
            fd = os.open(dst / f.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return seconds


def summary(nbytes: int, seconds: list[float]) -> dict:
    best, median = min(seconds), statistics.median(seconds)
    return {"bytes": nbytes, "seconds": [round(x, 3) for x in seconds], "min_s": round(best, 3),
            "median_s": round(median, 3), "mb_per_s_best": round(nbytes / MB / best, 1),
            "mb_per_s_median": round(nbytes / MB / median, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--shard-size", default="100MB", help="input and output shard cap (repskip size syntax)")
    ap.add_argument("--remove", default="3,14,17,25", help="layers to remove, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", help="scratch folder (default: a new temp dir under /tmp, deleted after)")
    ap.add_argument("--json", default=_common.default_json(NAME))
    ap.add_argument("--child", choices=["build", "compress"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        done = build_sharded(args) if args.child == "build" else compress_child(args)
        return print(json.dumps(done))

    from repskip.compress.files import parse_size  # imports no torch

    model = Path(args.model) if args.model else _common.default_model()
    shard_bytes = parse_size(args.shard_size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="repskip-bench-", dir="/tmp"))
    inp, out = work / "input", work / "output"
    shutil.rmtree(inp, ignore_errors=True)
    runs, times = [], {"compress": [], "write_pruned": [], "copy": [], "copy+fsync": []}
    try:
        print("building the sharded input ...", file=sys.stderr)
        _common.run_child(__file__, ["--child", "build", "--model", str(model), "--output", str(inp),
                                     "--shard-size", str(shard_bytes)])
        shards = weight_files(inp)
        sizes = [f.stat().st_size for f in shards]
        before = plain_copy(shards, work / "copy", fsync=False)
        for i in range(args.repeats):
            print(f"round {i + 1}/{args.repeats} ...", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # untimed, as in plain_copy
            runs.append(_common.run_child(__file__, ["--child", "compress", "--input", str(inp), "--output",
                                                     str(out), "--remove", args.remove, "--shard-size", args.shard_size]))
            times["compress"].append(runs[-1]["seconds"])
            times["write_pruned"].append(runs[-1]["write_pruned_s"])
            times["copy"].append(plain_copy(shards, work / "copy", fsync=False))
            times["copy+fsync"].append(plain_copy(shards, work / "copy", fsync=True))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    c = runs[-1]
    rows = {"compress (repskip)": summary(c["file_bytes_out"], times["compress"]),
            "write_pruned only": summary(c["file_bytes_out"], times["write_pruned"]),
            "plain copy (before)": summary(sum(sizes), [before]),
            "plain copy (after)": summary(sum(sizes), times["copy"]),
            "plain copy + fsync (after)": summary(sum(sizes), times["copy+fsync"])}
    largest, budget = max(sizes), max(sizes) * 1.25
    mem = {k: max(r[k] for r in runs) for k in ("rss_after_imports_mb", "peak_rss_mb", "peak_compress_call_mb")}
    mem |= {"call_growth_mb": max(round(r["peak_compress_call_mb"] - r["rss_after_imports_mb"], 1) for r in runs),
            "budget_mb": round(budget / MB, 1), "full_load_mb": round(c["bytes_in"] / MB, 1)}
    ratios = {f"{a} / {k}": round(rows[a]["mb_per_s_best"] / v["mb_per_s_best"], 3)
              for a in ("compress (repskip)", "write_pruned only") for k, v in rows.items() if k.startswith("plain")}
    targets = {"peak_rss_within_budget": mem["peak_rss_mb"] * MB <= budget,
               "call_growth_within_budget": mem["call_growth_mb"] * MB <= budget,
               "full_load_exceeds_budget": c["bytes_in"] > budget,
               **{f"throughput {k} >= 0.5": r >= 0.5 for k, r in ratios.items()}}

    print(f"\ninput: {len(sizes)} shards, {sum(sizes) / MB:.1f} MB, largest {largest / MB:.1f} MB; removed "
          f"layers {args.remove}; output {c['shards']} shards, {c['file_bytes_out'] / MB:.1f} MB; {args.repeats} repeats")
    print(_common.table(["run", "MB written", "min s", "median s", "MB/s (best)", "MB/s (median)"],
                        [[k, f"{v['bytes'] / MB:.1f}", f"{v['min_s']:.3f}", f"{v['median_s']:.3f}",
                          v["mb_per_s_best"], v["mb_per_s_median"]] for k, v in rows.items()]))
    print()
    print(_common.table(["memory", "MB"], [[k, v] for k, v in mem.items()]))
    print()
    print(_common.table(["throughput ratio (best MB/s)", "value", ">= 0.5"],
                        [[k, f"{r:.3f}", "yes" if r >= 0.5 else "NO"] for k, r in ratios.items()]))
    print(f"\npeak RSS {mem['peak_rss_mb']} MB <= budget {mem['budget_mb']} MB: {'yes' if targets['peak_rss_within_budget'] else 'NO'}"
          f"; growth of the call {mem['call_growth_mb']} MB <= budget: {'yes' if targets['call_growth_within_budget'] else 'NO'}"
          f"; full load {mem['full_load_mb']} MB > budget: {'yes' if targets['full_load_exceeds_budget'] else 'NO'}")
    settings = {"model": str(model), "shard_size": args.shard_size, "shard_bytes": shard_bytes,
                "remove": args.remove, "repeats": args.repeats, "workdir": args.workdir}
    results = {"input_shard_bytes": sizes, "largest_input_shard": largest, "budget_bytes": budget, "throughput": rows,
               "memory": mem, "compress_runs": runs, "throughput_ratios": ratios, "targets": targets}
    path = _common.write_json(args.json, _common.report(NAME, settings, results))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
