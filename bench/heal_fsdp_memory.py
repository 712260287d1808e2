"""Peak memory of each process of a two-process heal: data parallel against --fsdp.

The student is the model with --remove layers cut (written to a scratch folder), the teacher
the model itself. Each configuration runs `torchrun --nproc_per_node 2` over gloo on the CPU,
--steps steps of --method with distillation, and each process reports its peak RSS and the
parameters it held. glibc keeps the memory of freed large buffers (FSDP's gathered weights)
unless its mmap threshold is fixed, so each mode runs with the allocator as it is and with
MALLOC_MMAP_THRESHOLD_=65536. The healed weights of the runs must agree (the script fails
otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

NAME = "heal_fsdp_memory"


def worker(args: argparse.Namespace) -> None:
    """One process of the launch: heal, then print what it held and its peak RSS."""
    from repskip.train.heal import HealSettings, heal

    result = heal(args.student, args.out, data=args.data, teacher=args.teacher, fsdp=args.mode == "fsdp",
                  save_every=10_000, settings=HealSettings(method=args.method, steps=args.steps, seq_len=args.seq_len,
                                                           batch_size=2, eval_sequences=4))
    print("RESULT " + json.dumps({
        "rank": int(os.environ.get("RANK", 0)), "peak_rss_mb": _common.peak_rss_mb(),
        "held_parameters": result.record.get("held_parameters"), "wrote": result.wrote}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--remove", default="20,21,22,23", help="comma-separated layers the student lacks")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--data", default=str(_common.REPO.parent / "shared" / "data" / "wikitext2" / "valid.txt"))
    ap.add_argument("--json", default=_common.default_json(NAME))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import yaml
    from safetensors.torch import load_file

    from repskip import pipeline

    model = args.model or str(_common.default_model())
    scratch = Path(tempfile.mkdtemp(prefix="heal-fsdp-"))
    try:
        recipe = scratch / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"schema_version": 1,
                                          "resolved": {"remove": [int(x) for x in args.remove.split(",")]}}))
        student = scratch / "student"
        pipeline.compress(model, recipe, student)
        rows, runs = [], {}
        for mode in ("ddp", "fsdp"):
            for allocator in ("default", "mmap-threshold-64k"):
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                if allocator != "default":
                    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
                out = scratch / f"{mode}-{allocator}"
                print(f"{mode}, allocator {allocator} ...", file=sys.stderr)
                done = subprocess.run(
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                     "--worker", "--mode", mode, "--student", str(student), "--teacher", model, "--data", args.data,
                     "--out", str(out), "--method", args.method, "--steps", str(args.steps),
                     "--seq-len", str(args.seq_len)],
                    env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{mode} ({allocator}) failed:\n{done.stderr[-3000:]}")
                ranks = sorted((json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
                                if line.startswith("RESULT ")), key=lambda r: r["rank"])
                runs[f"{mode}/{allocator}"] = ranks
                weights = load_file(str(next(out.glob("*.safetensors"))))
                runs.setdefault("_weights", {})[f"{mode}/{allocator}"] = weights
                rows.append([mode, allocator] + [round(r["peak_rss_mb"]) for r in ranks]
                            + [ranks[0]["held_parameters"] or "all"])
        weights = runs.pop("_weights")
        first = next(iter(weights.values()))
        worst = max(float((w[k] - first[k]).abs().max()) for w in weights.values() for k in first)
        assert worst <= 1e-4, f"the runs' healed weights differ by {worst}"
        total = sum(t.numel() for t in load_file(str(next(student.glob("*.safetensors")))).values())
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{Path(model).name} less layers {args.remove}: {total:,} parameters; {args.method}, {args.steps} steps of "
          f"2 x {args.seq_len} tokens per process, teacher {Path(model).name}")
    print(_common.table(["mode", "allocator", "peak RSS rank 0 (MB)", "peak RSS rank 1 (MB)", "rank 0 holds"], rows))
    settings = {"model": model, "remove": args.remove, "method": args.method, "steps": args.steps,
                "seq_len": args.seq_len, "data": args.data, "processes": 2}
    results = {"runs": runs, "student_parameters": total, "max_weight_difference": worst}
    path = _common.write_json(args.json, _common.report(NAME, settings, results))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
