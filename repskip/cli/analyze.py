"""repskip analyze and select: measure the layers, choose which to remove, fit the repair."""

from __future__ import annotations

import contextlib

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import RepskipError
from ..outputs import atomic_dir, check_output
from ..progress import STATUS_NAME, Reporter
from .app import _float_list, _key_values, console, err_console, main, trust_remote_code_option


def _protect_list(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RepskipError(f"--protect takes comma-separated layer indices, got {text!r}") from None


def _analysis_table(analysis, chosen: list[int]) -> Table:
    table = Table(title=f"Layer similarity, cos(h_in, h_out), on {analysis.primary.replace('_', ' ')} positions")
    overlays = analysis.overlay_groups()[:4]
    for col in ("layer", "cos mean", "cos std", "angular", "BI", *(f"{g} cos" for g in overlays), ""):
        table.add_column(col.replace("_", " "), justify="right" if col else "left")
    extra = [analysis.cosine(g) for g in overlays]
    for row in analysis.layers():
        i = row["layer"]
        mark = "[red]removed[/]" if i in chosen else ""
        table.add_row(
            str(i), f"{row['cosine_mean']:.4f}", f"{row['cosine_std']:.4f}",
            f"{row['angular_distance_mean']:.4f}", f"{row['block_influence']:.4f}",
            *(f"{col[i]:.4f}" for col in extra), mark,
        )
    return table


def _cosine(ctx, param, value):
    if value is not None and not -1.0 <= value <= 1.0:  # also refuses nan
        raise RepskipError(f"--threshold is a cosine similarity: a number from -1 to 1, got {value}")
    return value


# What `analyze` does unless told otherwise. Which similarity strategy removes best depends on
# the model and on k (docs/benchmarks.md, "Quality per layer removed": on SmolLM2-135M the
# angular block with repair leads at k = 4 and 6 and collapses at k = 8, where block influence
# holds; on Qwen2.5-Coder-0.5B it leads at k = 4 and trails at k = 2), so auto lets the repaired
# calibration loss decide between their proposals. `select`, which cannot run the model, keeps
# block-influence. A recipe file that names no strategy still means paper, so that old recipes
# keep their meaning.
DEFAULT_STRATEGY = "auto"
SELECT_STRATEGY = "block-influence"
DEFAULT_REPAIR = "linear"


STRATEGY_HELP = ("How layers are chosen: by similarity (paper, block-influence, angular-block), by the calibration "
                 "loss a removal costs (loss: each layer alone; greedy-loss: one at a time, SLEB), or auto: the "
                 "similarity strategies' proposals (and the blocks beside the angular one) each repaired and scored "
                 "on held-out calibration text, the lowest loss taken. auto and the loss strategies run the model; "
                 "select reads what analyze recorded.")


def _selection_options(f=None, *, default: str = DEFAULT_STRATEGY):
    if f is None:
        return lambda g: _selection_options(g, default=default)
    opts = [
        click.option("--strategy", type=click.Choice(["auto", "paper", "block-influence", "angular-block", "loss",
                                                      "greedy-loss"]),
                     default=default, show_default=True, help=STRATEGY_HELP),
        click.option("-k", "k", type=click.IntRange(min=1), default=4, show_default=True, help="Layers to remove."),
        click.option("--threshold", type=float, default=0.95, show_default=True, callback=_cosine,
                     help="paper: a layer qualifies when its mean cos(in, out) is above this (-1 to 1)."),
        click.option("--allow-adjacent/--no-adjacent", default=None,
                     help="Allow two neighbouring layers [default: no for paper, yes for the others; "
                          "angular-block removes a contiguous block by definition]."),
        click.option("--protect", default=None, help="More protected layers, e.g. 2,-2."),
        click.option("--no-protect-ends", is_flag=True, help="Allow removing the first and last layer."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _selection_spec(strategy, k, threshold, allow_adjacent, protect, no_protect_ends, positions):
    from ..recipe import SelectionSpec

    return SelectionSpec(
        strategy=strategy, k=k, threshold=threshold, allow_adjacent=allow_adjacent,
        protect_first=not no_protect_ends, protect_last=not no_protect_ends,
        protect=_protect_list(protect), positions=positions,
    )


def _write_analysis_outputs(out: Path, analysis, recipe, threshold, repair: bytes | None = None) -> None:
    from ..analyze import plots
    from ..analyze.selection import protected_layers
    from ..repair.store import DEFAULT_NAME

    (out / "analysis.json").write_text(json.dumps(analysis.data, indent=1) + "\n")
    if repair is not None:
        (out / DEFAULT_NAME).write_bytes(repair)
    chosen = recipe.resolved.remove if recipe.is_resolved else []
    if recipe.is_resolved:
        recipe.save(out / "recipe.yaml")
    show_threshold = threshold if recipe.selection and recipe.selection.strategy == "paper" else None
    sel = recipe.selection
    protected = (sorted(protected_layers(analysis.num_layers, sel.protect_first, sel.protect_last, sel.protect))
                 if sel else None)
    plots.consecutive_similarity(analysis, out / "similarity.png", show_threshold, chosen, protected=protected)
    plots.similarity_heatmap(analysis, out / "similarity_matrix.png", chosen)
    plots.token_distance_profile(analysis, out / "token_distance.png")


@main.command()
@trust_remote_code_option
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for analysis.json, recipe.yaml and the plots.")
@click.option("--calib", default=None,
              help="Calibration text: a .txt file (blank-line paragraphs), .jsonl, or python-stdlib (the Python "
                   "standard library's source, for code models) [default: built-in set].")
@click.option("--calib-field", default=None, help="JSONL field holding the text [default: the first of text, question, prompt, problem, content].")
@click.option("--num-samples", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration sequences.")
@click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--positions", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="forward mode: token positions averaged for the per-layer scores.")
@click.option("--matrix-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Most tokens a batch contributes to the layer x layer matrix (a seeded sample past it); "
                   "bounds memory at (layers+1) x this x hidden floats. Per-layer scores use every token.")
@click.option("--mode", type=click.Choice(["forward", "masked", "sampling"]), default=None,
              help="forward: text as it is [AR default]; masked: mask part of each response at "
                   "--mask-ratios [diffusion default]; sampling: measure real denoising trajectories.")
@click.option("--mask-ratios", default="0.25,0.5,0.75,1.0", show_default=True,
              help="masked mode: per pass, the probability that each response token is masked "
                   "(at least one per sequence), one pass per ratio.")
@click.option("--prompt-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="masked mode: leading fraction of each sequence kept visible as the prompt.")
@click.option("--sampler-setting", "sampler_set", multiple=True, metavar="KEY=VALUE",
              help="sampling mode: a sampler setting, e.g. steps=64 (repeatable).")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="sampling mode: format prompts with the chat template if there is one.")
@_selection_options
@click.option("--repair", type=click.Choice(["none", "linear", "cosine"]), default=DEFAULT_REPAIR, show_default=True,
              help="linear: fit a least-squares map per removed run on the calibration text and fold it into the "
                   "MLP output projection of the layer in front (same architecture, no extra parameter); with a "
                   "loss strategy or auto, candidates are scored repaired. cosine: the same map fitted to the "
                   "direction of each token's target (ReplaceMe's cosine objective), slower, and on the best removal at each k "
                   "it kept no more than linear in repskip's benchmarks; not with a loss strategy.")
@click.option("--objective", type=click.Choice(["nll", "kl"]), default="nll", show_default=True,
              help="loss strategies: the calibration loss (nll: the model's own; kl: to the full model's predictions).")
@click.option("--ridge", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="repair: ridge towards no repair, relative to the mean diagonal of M^T M.")
@click.option("--search-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="loss strategies: calibration sequences each trial is scored on (the first of --num-samples); "
                   "the search costs about k x layers forward passes over them.")
@click.option("--dtype", default="auto", show_default=True, help="auto (as saved), float32, bfloat16, float16.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--offload", type=click.Choice(["auto", "none", "sequential"]), default="auto", show_default=True,
              help="sequential: keep the decoder layers on disk and run one at a time over every batch (models "
                   "bigger than memory); none: load it whole, refusing a model that does not fit; auto: "
                   "sequential when the model does not fit the device with headroom.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the run may use on the device (e.g. 12GB) [default: what is available].")
@click.option("--offload-folder", type=click.Path(path_type=Path), default=None,
              help="Where tensors transformers converts on load go while the model runs one layer at a time "
                   "(a fresh folder inside it, removed afterwards) [default: the system's temporary folder].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="When -o holds a finished analysis of the same model, calibration and settings, choose again "
                   "from it instead of measuring again.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists (measuring afresh).")
def analyze(model, output, calib, calib_field, num_samples, max_length, batch_size, positions, matrix_tokens, mode,
            mask_ratios, prompt_fraction, sampler_set, chat, strategy, k, threshold, allow_adjacent, protect,
            no_protect_ends, repair, objective, ridge, search_samples, dtype, device, offload, max_memory,
            offload_folder, seed, reuse, force):
    """Measure each layer of MODEL and write analysis.json, plots and a resolved recipe.yaml."""
    from .. import pipeline
    from ..recipe import CalibrationSpec, Recipe, resolve

    ratios = _float_list(mask_ratios, "--mask-ratios")
    sampler_settings = _key_values(sampler_set)
    spec = _selection_spec(strategy, k, threshold, allow_adjacent, protect, no_protect_ends, positions)
    spec = spec.model_copy(update=dict(mode=mode, mask_ratios=ratios, prompt_fraction=prompt_fraction,
                                       sampler=sampler_settings, chat=chat, repair=repair, objective=objective,
                                       ridge=ridge, search_samples=search_samples))
    cal = CalibrationSpec(source=calib or "builtin", field=calib_field, num_samples=num_samples,
                          max_length=max_length, batch_size=batch_size, seed=seed)
    pipeline.check_device_name(device)
    pipeline.check_repair_method(strategy, repair)
    reporter = Reporter("analyze", console=err_console)
    reporter.say(f"opening {model}")
    handle = pipeline.open_model(model)
    # every refusal now, not after the analysis
    from ..analyze.selection import LOSS_STRATEGIES, RUNS_MODEL, check_feasible

    check_feasible(handle.num_layers, strategy, k, allow_adjacent=allow_adjacent, protect_first=not no_protect_ends,
                   protect_last=not no_protect_ends, protect=spec.protect)
    if repair != "none":
        from ..repair.fit import check_supported

        check_supported(handle.family, handle.ckpt.config)
    from ..compress.files import parse_size
    from ..engine import offload as _offload

    budget = parse_size(max_memory) if max_memory is not None else None
    run_dtype, run_device = pipeline.parse_dtype(dtype), pipeline.parse_device(device)
    plan = pipeline.offload_plan(handle, offload, dtype, device, num_samples * max_length, budget, offload_folder)
    reused = None
    if reuse and not force and output.is_dir():
        reused = _reusable(output, handle, cal, mode, ratios, prompt_fraction, positions, matrix_tokens, dtype)
    if reused is None:
        check_output(output, force, [handle.path])
    saved_only = None  # the error to raise once the measurements are saved
    with atomic_dir(output, force or reused is not None, [handle.path], command="analyze") as tmp, \
            contextlib.ExitStack() as stack:
        reporter.move_status(tmp / STATUS_NAME)
        reporter.say(f"working in {tmp} ({output} appears when it is done)")
        torch_model = None
        if reused is None or strategy in RUNS_MODEL or repair != "none":
            reporter.say(f"loading {handle.path.name} ({dtype}, {device})")
            torch_model = stack.enter_context(_offload.loaded(
                handle, run_dtype, run_device, plan=plan, tokens=num_samples * max_length, max_memory=budget,
                folder=offload_folder, say=reporter.say))
        if reused is not None:
            result = reused
        else:
            with reporter.stage("analysing", "sequences") as update:
                result = pipeline.analyze(
                    handle, calib=calib, calib_field=calib_field, num_samples=num_samples,
                    max_length=max_length, batch_size=batch_size, seed=seed, positions=positions, mode=mode,
                    matrix_tokens=matrix_tokens,
                    mask_ratios=ratios, prompt_fraction=prompt_fraction, sampler_settings=sampler_settings, chat=chat,
                    dtype=dtype, device=device, progress=update, torch_model=torch_model,
                )
        if strategy in LOSS_STRATEGIES:
            from ..analyze.reuse import search_matches

            request = {"strategy": strategy, "objective": objective, "repair": repair != "none",
                       "sequences": min(search_samples, num_samples), "k": k,
                       **pipeline.search_request(handle, spec)}
            if search_matches(result.data.get("search"), request):
                reporter.say("reusing the loss search recorded in the analysis")
            else:
                with reporter.stage("searching", "batches") as update:
                    result.data["search"] = pipeline.loss_search(handle, torch_model, spec, cal, progress=update)
        elif strategy == "auto":
            request = pipeline.auto_request(handle, spec, result.data["calibration"]["hash"])
            recorded = result.data.get("auto") or {}
            if all(recorded.get(key) == value for key, value in request.items()):
                reporter.say("reusing the auto choice recorded in the analysis")
            else:
                with reporter.stage("weighing candidates", "steps") as update:
                    result.data["auto"] = pipeline.auto_search(handle, torch_model, result, spec, cal, progress=update)
        unresolved = Recipe(selection=spec, calibration=cal)
        try:
            recipe = resolve(unresolved, result)
            pipeline.check_removable(handle, recipe.resolved.remove)  # the family can write it (config fields)
        except RepskipError as exc:
            # The measurements are still worth keeping: save them, then say how to choose again.
            _write_analysis_outputs(tmp, result, unresolved, threshold)
            recipe, saved_only = unresolved, exc
        maps_file = None
        if saved_only is None and repair != "none":
            from ..repair.store import DEFAULT_NAME

            with reporter.stage("fitting repair", "layers") as update:
                fit = pipeline.fit_repair(handle, torch_model, recipe.resolved.remove, spec, cal, progress=update)
            recipe, maps_file = pipeline.with_repair(recipe, fit, DEFAULT_NAME)
        if saved_only is None:
            _write_analysis_outputs(tmp, result, recipe, threshold, maps_file)
        reporter.finish("done" if saved_only is None else "saved the analysis; no recipe")
    reporter.move_status(None)
    if saved_only is not None:
        console.print(_analysis_table(result, []))
        kept_flags = "".join([f" --protect {protect}" if protect else "", " --no-protect-ends" if no_protect_ends else "",
                              {True: " --allow-adjacent", False: " --no-adjacent", None: ""}[allow_adjacent]])
        hint = (f"--threshold {threshold - 0.05:.2f} -k {k}" if strategy == "paper" else f"-k {max(1, k - 1)}") + kept_flags
        raise RepskipError(
            f"{saved_only}. The analysis was saved in {output}: choose again without re-running the "
            f"model, e.g. repskip select {output}/analysis.json -o recipe.yaml --strategy {strategy} {hint}, or "
            f"this analyze command with those choices (it reuses the analysis)"
        ) from None
    console.print(_analysis_table(result, recipe.resolved.remove))
    cal_info = result.data["calibration"]
    console.print(
        f"calibration: {cal_info['sequences']} sequences, {cal_info['tokens']} tokens from {cal_info['source']}"
    )
    search = result.data.get("search")
    if search:
        console.print(f"loss search ({search['objective']}{', repaired' if search['repair'] else ''}): full model "
                      f"{search['base_loss']:.4f}, {len(search['rounds'])} round(s) in {search['seconds']:.1f} s")
    if strategy == "auto":
        console.print(_candidates_table(result.data["auto"]))
    console.print(f"[bold]{strategy}[/] k={k}: remove layers [bold red]{recipe.resolved.remove}[/]")
    if recipe.resolved.repair:
        fits = ", ".join(f"layer {m.layer} <- {m.run[0]}..{m.run[1]}: {m.residual:.3f}" for m in recipe.resolved.repair.maps)
        console.print(f"linear repair, residual / plain removal: {fits}")
    console.print(f"wrote {output}/analysis.json, recipe.yaml, "
                  + ("repair.safetensors, " if maps_file else "")
                  + f"similarity.png, similarity_matrix.png, token_distance.png, {STATUS_NAME}")


def _candidates_table(record: dict) -> Table:
    """The removals auto weighed, lowest loss first."""
    table = Table(title=f"auto: candidates scored on {record['tokens']} held-out calibration tokens "
                        f"(full model {record['objective']} {record['base_loss']:.4f})")
    for name in ("remove", "proposed by", "loss", "maps kept (checked)", "fit s"):
        table.add_column(name, justify="right" if name in ("loss", "fit s") else "left")
    for c in sorted(record["candidates"], key=lambda c: c["loss"]):
        chosen = c["remove"] == record["chosen"]
        kept = ", ".join(f"{a}:{'yes' if ok else 'no'}" for a, ok in (c["maps_kept"] or {}).items()) or "-"
        table.add_row(("[bold]" if chosen else "") + str(c["remove"]), ", ".join(c["proposed_by"]),
                      f"{c['loss']:.4f}", kept, f"{c['fit_seconds']:.1f}")
    return table


def _reusable(output: Path, handle, cal, mode, ratios, prompt_fraction, positions, matrix_tokens, dtype):
    """The finished analysis in ``output`` when it measured what this run would (said on
    stderr either way), else None; a folder holding none is left to check_output."""
    from ..analyze import reuse

    previous = reuse.previous(output)
    if previous is None:
        return None
    mode = mode or ("masked" if handle.family.generative_kind == "diffusion" else "forward")
    settings = {"mode": mode, "num_samples": cal.num_samples, "calib_field": cal.field, "positions": positions,
                "batch_size": cal.batch_size, "seed": cal.seed, "matrix_tokens": matrix_tokens}
    if mode == "masked":
        settings.update(mask_ratios=ratios, prompt_fraction=prompt_fraction)
    why = reuse.mismatch(
        previous, fingerprint=handle.ckpt.fingerprint(), settings=settings,
        calibration_hash=reuse.calibration_hash(handle, None if cal.source == "builtin" else cal.source, cal.field,
                                                cal.num_samples, cal.max_length, cal.seed),
        dtype=None if dtype == "auto" else _dtype_name(dtype))
    if why:
        err_console.print(f"{output} holds an analysis that cannot be reused ({why})", highlight=False)
        return None
    err_console.print(f"reusing the analysis in {output} ({reuse.describe(previous)}); choosing again from it. "
                      "--no-reuse measures afresh", highlight=False)
    return previous


def _dtype_name(name: str) -> str:
    from ..pipeline import parse_dtype

    return str(parse_dtype(name)).replace("torch.", "")


@main.command()
@click.argument("analysis_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Recipe YAML to write.")
@_selection_options(default=SELECT_STRATEGY)
@click.option("--force", is_flag=True, help="Replace the recipe file if it exists.")
def select(analysis_file, output, strategy, k, threshold, allow_adjacent, protect, no_protect_ends, force):
    """Choose layers from an existing analysis.json without re-running the model."""
    from ..analyze.analysis import Analysis
    from ..recipe import Recipe, is_recipe_file, resolve

    if analysis_file.is_dir() and (analysis_file / "analysis.json").is_file():
        analysis_file = analysis_file / "analysis.json"  # the run folder of 'repskip analyze'
    if not analysis_file.is_file():
        raise RepskipError(f"analysis file {analysis_file} does not exist")
    try:
        data = json.loads(analysis_file.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepskipError(f"{analysis_file} is not a JSON analysis ({str(exc).splitlines()[0]}); "
                           "pass the analysis.json that 'repskip analyze' wrote") from None
    result = Analysis.from_dict(data, str(analysis_file))
    check_output(output, force, [analysis_file], file=True, owned=is_recipe_file)
    spec = _selection_spec(strategy, k, threshold, allow_adjacent, protect, no_protect_ends, "all")
    recipe = resolve(Recipe(selection=spec), result)  # calibration and positions come from the analysis
    recipe.save(output)
    console.print(f"[bold]{strategy}[/] k={k}: remove layers [bold red]{recipe.resolved.remove}[/]; wrote {output}")
    console.print("no repair: select does not run the model, so it cannot fit one; for a repaired recipe run "
                  f"repskip analyze MODEL --strategy {strategy} -k {k} --repair linear")
