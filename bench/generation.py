"""HumanEval pass@1 of layer removals as a user makes them, on a model that writes code.

For Qwen2.5-Coder-0.5B-Instruct (or --model), at each k of --ks, each configuration of
--configs is chosen with ``repskip analyze`` exactly as a user runs it (timed), then measured
with ``repskip verify --bench humaneval`` against the full model: all 164 problems (or
--limit), greedy, through the chat template, each program run in repskip's sandbox.

Configurations:

- ``plain``: block influence's layers removed, no repair (ShortGPT's removal);
- ``old-default``: block influence with the linear repair, built-in calibration text
  (repskip's default before ``auto``);
- ``auto``: ``--strategy auto`` with the linear repair (the default), built-in text;
- ``auto-self``: ``auto`` calibrated on the model's own answers to the 48 built-in prompts
  (``repskip self-calibrate``, greedy);
- ``auto-code``: ``auto`` calibrated on the Python standard library (``--calib python-stdlib``).

With --heal, each configuration is also compressed (``repskip compress``), healed
(``repskip heal``, distilled from the full model on --heal-data with the --heal-* settings;
the command and its training time are recorded; a heal an earlier run finished of the same
student, teacher, data and settings is reused with its time, and one it stopped resumes from
its state of at most 10 steps before) and measured the same way, as ``NAME+heal`` (with
``-DATA``, ``-layers-LAYERS``, ``-aroundN``, ``-Nsteps`` and ``-lrLR`` added for other data
than the standard library, other layers than one each side of the cuts, other than 100 steps
and another learning rate than 1e-3). ``--heal-data self-mbpp`` is the
full model's own greedy chat answers to MBPP's training prompts (task_id 601-974, none of
HumanEval or of MBPP's test split), written once by ``repskip self-calibrate``: distillation
text in the form the model is used in.

Every verify writes to one folder, so the full model's generations are made once and each
configuration is paired with them item by item. Generations are kept per item: a rerun
(in this session or, through --results, a later one) resumes where the last one stopped.
The per-item records and each configuration's report go to --results, the summary to
--json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

REPSKIP = [sys.executable, "-m", "repskip"]
DATA = _common.REPO.parent / "shared" / "data"
MBPP_TRAIN = range(601, 975)  # MBPP's standard training split, by task_id
CONFIGS = {  # name -> (strategy, repair, calibration source or None for the built-in text)
    "plain": ("block-influence", "none", None),
    "old-default": ("block-influence", "linear", None),
    "auto": ("auto", "linear", None),
    "auto-self": ("auto", "linear", "self"),
    "auto-code": ("auto", "linear", "python-stdlib"),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder [default: Qwen2.5-Coder-0.5B-Instruct, fetched]")
    p.add_argument("--ks", default="2,4")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--limit", type=int, default=0, help="first N problems (0: all 164)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heal", action="store_true", help="also heal each configuration and measure it")
    p.add_argument("--heal-data", default="python-stdlib",
                   help="heal's --data, or self-mbpp: the full model's answers to MBPP's training prompts")
    p.add_argument("--heal-prompts", type=int, default=0,
                   help="self-mbpp: answer a seeded sample of this many of the 374 prompts (0: all)")
    p.add_argument("--heal-steps", type=int, default=100)
    p.add_argument("--heal-layers", default="around-cuts", help="heal's --layers: around-cuts, all, or indices")
    p.add_argument("--heal-around", type=int, default=1, help="heal's --around: kept layers trained each side of a cut")
    p.add_argument("--heal-method", default="lora")
    p.add_argument("--heal-lr", type=float, default=1e-3)
    p.add_argument("--heal-batch-size", type=int, default=4)
    p.add_argument("--heal-seq-len", type=int, default=256)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "repskip" / "bench-generation"))
    p.add_argument("--results", default=str(_common.REPO / "bench" / "results" / "generation"),
                   help="per-item records and reports, kept with the repository so a later run resumes")
    p.add_argument("--json", default=_common.default_json("generation"))
    return p.parse_args()


def run(args: list, log: Path) -> float:
    """Run a repskip command, its output to ``log``; the wall time, or exit on failure."""
    t = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ repskip {' '.join(map(str, args))}\n")
        fh.flush()
        child = subprocess.Popen([*REPSKIP, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT)
        try:
            code = child.wait()
        except BaseException:  # stopped (Ctrl-C, SIGTERM): stop the command too, then go
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
    if code != 0:
        sys.exit(f"repskip {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - t


def mbpp_answers(model: Path, work: Path, log: Path, limit: int) -> tuple[Path, float]:
    """The full model's greedy chat answers to MBPP's training prompts (``limit`` of them, 0: all),
    as heal data; the file and the seconds it took (0 when an earlier run wrote it)."""
    out = work / f"self-mbpp-train{f'-{limit}' if limit else ''}.jsonl"
    if out.is_file():
        return out, 0.0
    tasks = [json.loads(line) for line in (DATA / "mbpp" / "mbpp.jsonl").read_text().splitlines() if line.strip()]
    prompts = work / "mbpp-train-prompts.jsonl"
    with open(prompts, "w") as fh:
        for task in (t for t in tasks if t["task_id"] in MBPP_TRAIN):
            prompt = f"{task['text']}\nYour code should pass this test:\n{task['test_list'][0]}"
            fh.write(json.dumps({"prompt": prompt}) + "\n")
    count = limit or sum(1 for _ in open(prompts))
    seconds = run(["self-calibrate", model, "--prompts", prompts, "--num-samples", count, "--max-new-tokens", 384,
                   "-o", out], log)
    return out, seconds


def earlier_heal(compressed: Path, teacher: Path, healed: Path, heal_data: str, args: argparse.Namespace) -> float | None:
    """The seconds of a finished heal in ``healed`` of this very student, teacher, data and settings
    (an earlier run's, which this one reuses), or None when there is none."""
    from repskip.checkpoint import open_checkpoint

    try:
        record = json.loads((healed / "heal.json").read_text())
    except (OSError, ValueError):
        return None
    settings = record.get("settings", {})
    wanted = {"method": args.heal_method, "layers": args.heal_layers, "around": args.heal_around,
              "steps": args.heal_steps, "lr": args.heal_lr,
              "batch_size": args.heal_batch_size, "seq_len": args.heal_seq_len, "loss": "kd"}
    same = (all(settings.get(key) == value for key, value in wanted.items())
            and str(record.get("data", {}).get("source", "")).startswith(str(heal_data))
            and record.get("student", {}).get("fingerprint") == open_checkpoint(compressed).fingerprint()
            and record.get("teacher", {}).get("fingerprint") == open_checkpoint(teacher).fingerprint())
    return float(record["seconds"]) if same else None


def heal_name(args: argparse.Namespace) -> str:
    """The tag of a healed row and its folder: ``heal``, then each setting that differs from the
    first heal measured (standard library, one layer each side of the cuts, 100 steps, lr 1e-3), so that runs with
    other settings never share a folder. A data file is named by its stem, never its path."""
    tag = "heal"
    if args.heal_data != "python-stdlib":
        tag += f"-{Path(args.heal_data).stem}"
    if args.heal_layers != "around-cuts":
        tag += f"-layers-{args.heal_layers.replace(',', '_')}"
    if args.heal_layers == "around-cuts" and args.heal_around != 1:
        tag += f"-around{args.heal_around}"
    if args.heal_steps != 100:
        tag += f"-{args.heal_steps}steps"
    if args.heal_lr != 1e-3:
        tag += f"-lr{args.heal_lr:g}"
    return tag


def main() -> None:
    args = parse()
    # a SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C, so run() ends the command it waits on
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    model = Path(args.model) if args.model else _common.coder_model()
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    verify_dir = work / "verify"
    if (results / "cache").is_dir():  # what an earlier run measured: resume from it
        shutil.copytree(results / "cache", verify_dir / "cache", dirs_exist_ok=True)
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    limit = ["--limit", str(args.limit)] if args.limit else []

    def measure(row: dict, compressed: list) -> dict:
        """HumanEval on the full model and ``compressed`` (a checkpoint, or --recipe PATH)."""
        tag = f"k{row['k']}-{row['config']}"
        say(f"{tag}: verify")
        seconds = run(["verify", model, *compressed, "--bench", "humaneval", *limit, "--batch-size", args.batch_size,
                       "--speed-repeats", 0, "-o", verify_dir], log)
        shutil.copy(verify_dir / "report.json", results / f"{tag}.json")
        shutil.copytree(verify_dir / "cache", results / "cache", dirs_exist_ok=True)
        entry = json.loads((verify_dir / "report.json").read_text())["benchmarks"]["humaneval"]
        row = {**row, "verify_seconds": round(seconds, 1), "humaneval": {
            key: entry.get(key) for key in ("items", "base", "compressed", "retention", "retention_ci95", "p_value",
                                            "cut_by_cap", "empty_answers")}}
        say(f"{tag}: {json.dumps(row['humaneval'])}")
        return row

    self_calib = work / "self-calibration.jsonl"
    heal_data = args.heal_data  # a folder's or file's name tags its rows and output: no path in a folder name
    heal_tag = heal_name(args)
    if args.heal and args.heal_data == "self-mbpp":
        say("self-mbpp: the full model's answers to MBPP's training prompts")
        heal_data, seconds = mbpp_answers(model, work, log, args.heal_prompts)
        say(f"self-mbpp: {heal_data} ({seconds:.0f} s)")
    rows = []
    for k in [int(k) for k in args.ks.split(",")]:
        for name in args.configs.split(","):
            strategy, repair, calib = CONFIGS[name]
            if calib == "self" and not self_calib.is_file():
                say("self-calibrate: the model's answers to the built-in prompts")
                seconds = run(["self-calibrate", model, "-o", self_calib], log)
                say(f"self-calibrate: {seconds:.0f} s")
            source = str(self_calib) if calib == "self" else calib
            runs = work / f"k{k}-{name}"
            analyze = ["analyze", model, "-o", runs, "-k", k, "--strategy", strategy, "--repair", repair, "--force"]
            if source:
                analyze += ["--calib", source]
            say(f"k={k} {name}: analyze")
            select_seconds = run(analyze, log)
            analysis = json.loads((runs / "analysis.json").read_text())
            resolved = yaml.safe_load((runs / "recipe.yaml").read_text())["resolved"]
            say(f"k={k} {name}: removes {resolved['remove']} ({select_seconds:.0f} s)")
            row = {"k": k, "config": name, "strategy": strategy, "repair": repair, "calibration": calib or "builtin",
                   "removed": resolved["remove"],
                   "repaired_at": [m["layer"] for m in (resolved.get("repair") or {}).get("maps", [])],
                   "select_seconds": round(select_seconds, 1),
                   "auto": analysis.get("auto", {}).get("chosen") if strategy == "auto" else None}
            rows.append(measure(row, ["--recipe", runs / "recipe.yaml"]))
            if args.heal:
                compressed, healed = work / f"k{k}-{name}-model", work / f"k{k}-{name}-{heal_tag}"
                run(["compress", model, "--recipe", runs / "recipe.yaml", "-o", compressed, "--force"], log)
                heal = ["heal", compressed, "--teacher", model, "--data", heal_data, "-o", healed,
                        "--steps", args.heal_steps, "--method", args.heal_method, "--lr", args.heal_lr,
                        "--layers", args.heal_layers, "--around", args.heal_around,
                        "--batch-size", args.heal_batch_size, "--seq-len", args.heal_seq_len, "--loss", "kd",
                        "--save-every", 10, "--force"]  # a LoRA state is small: a stopped run loses 10 steps at most
                heal_seconds = earlier_heal(compressed, model, healed, heal_data, args)
                if heal_seconds is not None:
                    say(f"k={k} {name}: healed by an earlier run in {heal_seconds:.0f} s ({healed})")
                else:
                    say(f"k={k} {name}: heal ({args.heal_steps} steps on {args.heal_data})")
                    wall = run(heal, log)
                    # the training's time as heal.json records it: over every run a killed
                    # and resumed heal took, without the loading and writing
                    heal_seconds = float(json.loads((healed / "heal.json").read_text())["seconds"])
                    say(f"k={k} {name}: healed, {heal_seconds:.0f} s of training ({wall:.0f} s for the command)")
                rows.append(measure({**row, "config": f"{name}+{heal_tag}", "heal_seconds": round(heal_seconds, 1),
                                     "heal_command": "repskip " + " ".join(map(str, heal))}, [healed]))

    settings = {"model": str(model), "ks": args.ks, "configs": args.configs, "limit": args.limit or None,
                "batch_size": args.batch_size, "bench": "humaneval, greedy, chat template, sandboxed",
                **({key: value for key, value in vars(args).items() if key.startswith("heal")} if args.heal else {})}
    _common.write_json(args.json, _common.report("generation", settings, {"rows": rows}))
    print(_common.table(["k", "config", "removed", "pass@1", "retention", "select s"],
                        [[r["k"], r["config"], r["removed"], r["humaneval"].get("compressed"),
                          r["humaneval"].get("retention"), r["select_seconds"]] for r in rows]))


if __name__ == "__main__":
    main()
