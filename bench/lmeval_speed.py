"""repskip's lm-eval model against lm-eval's own Hugging Face backend: the same local ARC-Easy
task, the same checkpoint, the same batch size, timed alternately.

A task file is written to a temporary folder: ARC-Easy from ../shared/data/arc in lm-eval's
arc_easy layout ("Question: {stem}\\nAnswer:", one choice per continuation, acc and
acc_norm). Each repeat runs both commands back to back, the order alternating, as separate
processes (so both pay for their imports and model load, as a user's run does); the wall
time of each process and the accuracies it reports are recorded. The figures go to --json and
are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA = _common.REPO.parent / "shared" / "data" / "arc" / "ARC-Easy-Test.jsonl"
BIN = Path(sys.executable).parent
TASK = """task: repskip_bench_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder [default: SmolLM2-135M-Instruct]")
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--batch-size", default="8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=_common.default_json("lmeval_speed"))
    return p.parse_args()


def run(command: list[str], out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{command[0]} failed:\n{proc.stderr[-2000:]}")
    return {"seconds": seconds, "out": out}


def scores(path: Path) -> dict:
    """acc and acc_norm from either tool's results JSON (lm-eval writes into a folder)."""
    files = [path] if path.is_file() else sorted(path.rglob("results*.json"))
    doc = json.loads(files[-1].read_text())
    task = doc["results"]["repskip_bench_arc_easy"]
    return {"acc": task["acc,none"], "acc_norm": task["acc_norm,none"]}


def main() -> None:
    args = parse()
    model = Path(args.model) if args.model else _common.default_model()
    work = Path(tempfile.mkdtemp(prefix="lmeval-speed-"))
    (work / "tasks").mkdir()
    (work / "tasks" / "arc.yaml").write_text(TASK.format(data=DATA))
    common = ["--tasks", "repskip_bench_arc_easy", "--limit", str(args.limit)]

    def ours(r: int) -> dict:
        out = work / f"ours-{r}.json"
        return run([str(BIN / "repskip"), "lm-eval", str(model), *common, "--include-path", str(work / "tasks"),
                    "--batch-size", args.batch_size, "-o", str(out)], out)

    def theirs(r: int) -> dict:
        out = work / f"theirs-{r}"
        return run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                    *common, "--include_path", str(work / "tasks"), "--batch_size", args.batch_size,
                    "--device", "cpu", "--output_path", str(out)], out)

    times: dict[str, list[float]] = {"repskip lm-eval": [], "lm_eval --model hf": []}
    results: dict[str, dict] = {}
    for r in range(args.repeats):
        order = [("repskip lm-eval", ours), ("lm_eval --model hf", theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            got = fn(r)
            times[name].append(got["seconds"])
            results[name] = scores(got["out"])
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {got['seconds']:.1f} s, {results[name]}", flush=True)
    rows = [[name, f"{statistics.median(t):.1f}", ", ".join(f"{x:.1f}" for x in t),
             f"{results[name]['acc']:.4f}", f"{results[name]['acc_norm']:.4f}"] for name, t in times.items()]
    print(_common.table(["backend", "median s", "runs s", "acc", "acc_norm"], rows))
    summary = {"model": str(model), "times_s": times, "scores": results,
               "ratio": statistics.median(times["lm_eval --model hf"]) / statistics.median(times["repskip lm-eval"])}
    print(f"written {_common.write_json(args.json, _common.report('lmeval_speed', vars(args), summary))}")


if __name__ == "__main__":
    main()
