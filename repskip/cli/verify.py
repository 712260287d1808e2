"""repskip verify and lm-eval: what the compressed model kept, on benchmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ..errors import RepskipError
from ..outputs import check_output, write_atomic
from ..progress import STATUS_NAME, Reporter
from .app import _key_values, console, err_console, main, spread_options, trust_remote_code_option


def _bench_options(pairs: tuple[str, ...]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in _key_values(pairs, "--bench-option").items():
        bench, dot, option = key.partition(".")
        if not dot or not bench or not option:
            raise RepskipError(f"--bench-option takes BENCH.KEY=VALUE, got {key!r}")
        out.setdefault(bench, {})[option] = value
    return out


def _data_map(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise RepskipError(f"--data takes BENCH=PATH, got {pair!r}")
        out[name.strip()] = path.strip()
    return out


@main.command()
@trust_remote_code_option
@click.argument("base")
@click.argument("compressed", required=False)
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="Verify BASE with this resolved recipe applied in memory, instead of COMPRESSED.")
@click.option("--bench", "benches", default="gsm8k", show_default=True,
              help="Comma-separated benchmarks (see 'repskip plugins'), e.g. gsm8k,math500,humaneval,mbpp,perplexity.")
@click.option("--data", "data", multiple=True, metavar="BENCH=PATH", help="Local data file for a benchmark (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N items of each benchmark.")
@click.option("--min-retention", type=click.FloatRange(min=0), default=None,
              help="Exit with code 1 when any benchmark's retention is below this.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("runs/verify"), show_default=True,
              help="Folder for report.json, report.md and the per-item cache (a rerun resumes from it).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Sampler setting for every benchmark (repeatable).")
@click.option("--bench-option", "bench_opts", multiple=True, metavar="BENCH.KEY=VALUE",
              help="A benchmark's option, e.g. gsm8k.shots=0 or humaneval.timeout_s=5 (repeatable).")
@click.option("--presets", type=click.Path(path_type=Path), default=None,
              help="Sampler presets YAML [default: recipes/presets/sampling.yaml].")
@click.option("--sampler", default=None, help="Sampler plugin [default: the family's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat/--no-chat", default=True, show_default=True, help="Format prompts with the chat template.")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@spread_options
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="COMPRESSED as an ONNX export: ONNX Runtime execution provider.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--allow-unsafe-code-execution", "allow_unsafe", is_flag=True,
              help="Where the sandbox's OS isolation is unavailable, run HumanEval / MBPP code without it (only on a "
                   "machine you can afford to lose; see docs/verify.md).")
@click.option("--speed-repeats", type=click.IntRange(min=0), default=5, show_default=True,
              help="Alternating timed runs of each model for the speed comparison (0: none).")
@click.option("--card", is_flag=True,
              help="Add the retention table to COMPRESSED's model card (README.md, one repskip wrote).")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True,
              help="perplexity: tokens of each item scored (the rest is not read); never more than the model's "
                   "context length.")
def verify(base, compressed, recipe_path, benches, data, limit, min_retention, output, overrides, bench_opts, presets,
           sampler, batch_size, chat, dtype, device, device_map, max_memory, offload_folder, provider, seed, allow_unsafe,
           speed_repeats, card, max_length):
    """Compare COMPRESSED (or BASE with --recipe) against BASE on benchmarks: retention with a
    95% confidence interval and a paired test, FLOPs reduction and measured speed. COMPRESSED
    may be a safetensors checkpoint or an ONNX export (run on ONNX Runtime)."""
    from ..verify import report as report_mod, run as verify_mod
    from ..compress.files import parse_size
    from ..pipeline import check_device_name

    check_device_name(device)
    names = [b.strip() for b in benches.split(",") if b.strip()]
    reporter = Reporter("verify", console=err_console, status=output / STATUS_NAME)
    update, close = reporter.tracker("items")
    try:
        report = verify_mod.verify(
            base, compressed, recipe=recipe_path, benches=names, data=_data_map(data), limit=limit, output=output,
            batch_size=batch_size, chat=chat, seed=seed, sampler=sampler, overrides=_key_values(overrides, "--set"),
            presets=presets, bench_options=_bench_options(bench_opts),
            dtype=None if dtype == "auto" else dtype, device=device, device_map=device_map,
            max_memory=parse_size(max_memory) if max_memory is not None else None, offload_folder=offload_folder,
            provider=provider,
            allow_unsafe_code_execution=allow_unsafe, progress=update, say=reporter.say, speed_repeats=speed_repeats,
            max_length=max_length, card=card,
        )
    finally:
        close()
    reporter.finish("done")
    if not report:  # a secondary process of a multi-process run: rank 0 reports
        return
    table = Table(title=f"verify: {report['compressed']['layers']} of {report['base']['layers']} layers kept")
    for col in ("benchmark", "items", "metric", "base", "compressed", "retention", "95% CI", "p", "FLOPs cut"):
        table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for name, e in report["benchmarks"].items():
        lo, hi = e["retention_ci95"]
        ok = min_retention is None or e["retention"] >= min_retention
        ret = f"[{'green' if ok else 'red'}]{e['retention']:.3f}[/]" + (" [yellow](uninformative)[/]" if e.get("uninformative") else "")
        flops_cut = f"{e['flops']['reduction']:.1%}" if e.get("flops") else "-"
        table.add_row(name, str(e["items"]), e["metric"], f"{e['base']:.4g}", f"{e['compressed']:.4g}", ret,
                      f"{lo:.3f}-{hi:.3f}", f"{e['p_value']:.3g}", flops_cut)
    console.print(table)
    for name, e in report["benchmarks"].items():
        if e.get("prompt_variant"):
            cap = e["settings"].get("max_new_tokens") or e["settings"].get("gen_length")
            console.print(f"{name}: {escape(e['prompt_variant'])}, up to {cap} new tokens", highlight=False)
        if report_mod.cut_note(e):
            console.print(f"[yellow]{name}[/]: {escape(report_mod.cut_note(e))}", highlight=False)
        if report_mod.empty_note(e):
            console.print(f"[yellow]{name}[/]: {escape(report_mod.empty_note(e))}", highlight=False)
        if e.get("uninformative"):
            console.print(f"[yellow]{name}: uninformative[/]: {escape(e['uninformative_why'])}"
                          + escape(report_mod.items_needed_note(e)), highlight=False)
    for line in report_mod.speed_lines(report.get("speed")):
        console.print(escape(line), highlight=False)
    console.print(f"wrote {output}/report.json and report.md")
    if min_retention is not None:
        failed = report_mod.failing(report, min_retention)
        if failed:
            err_console.print(f"[red]retention below {min_retention} on: {', '.join(failed)}[/]")
            sys.exit(1)


@main.command("lm-eval")
@trust_remote_code_option
@click.argument("model")
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="A resolved recipe applied in memory.")
@click.option("--include-path", type=click.Path(path_type=Path), default=None, help="Folder of extra task YAML files.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Items per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None)
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="More model arguments, e.g. sampler_steps=64 or mc_samples=32 (repeatable).")
@click.option("--dtype", default=None)
@click.option("--device", default="cpu", show_default=True)
@spread_options
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the results as JSON (kind repskip.lm-eval: lm-eval's results under 'results').")
@click.option("--batch-size", default="8", show_default=True,
              help="Requests per forward pass for log-likelihoods (sorted by length; choices sharing a context run "
                   "it once), or auto: as many as fit 4096 padded tokens (32768 on CUDA).")
@click.option("--force", is_flag=True, help="Replace the -o file if an earlier 'repskip lm-eval' wrote it.")
def lm_eval_command(model, tasks, recipe_path, include_path, limit, num_fewshot, model_args, dtype, device, device_map,
                    max_memory, offload_folder, output, batch_size, force):
    """Run lm-evaluation-harness tasks on MODEL (needs the lm-eval extra)."""
    if output is not None:
        check_output(output, force, [Path(model)], file=True, owned=_is_lm_eval_results)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RepskipError("lm-eval is not installed: pip install 'repskip[lm-eval]'") from None
    from ..verify.lmeval import RepskipLM

    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise RepskipError(f"--batch-size takes a positive number or auto, got {batch_size!r}")
    lm = RepskipLM(pretrained=model, recipe=str(recipe_path) if recipe_path else None, dtype=dtype, device=device,
                   batch_size=batch_size, device_map=device_map, max_memory=max_memory,
                   offload_folder=offload_folder and str(offload_folder), **_key_values(model_args, "--model-arg"))
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise RepskipError(f"lm-eval knows no task {unknown[0]!r}; give --include-path for local task files")
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    table = Table(title=f"lm-eval on {Path(model).name}" + (f" with {recipe_path}" if recipe_path else ""))
    for col in ("task", "metric", "value"):
        table.add_column(col)
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not key.startswith("alias"):
                table.add_row(task, key, f"{value:.4g}")
    console.print(table)
    if output:
        doc = {"schema_version": 1, "kind": "repskip.lm-eval", "model": model, "recipe": recipe_path and str(recipe_path),
               "tasks": names, "results": results["results"]}
        write_atomic(output, json.dumps(doc, indent=1, default=str) + "\n")
        console.print(f"wrote {output}")


def _is_lm_eval_results(path: Path) -> bool:
    try:
        return json.loads(path.read_text("utf-8")).get("kind") == "repskip.lm-eval"
    except (OSError, ValueError, AttributeError):
        return False
