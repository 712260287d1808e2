"""The ``repskip`` command line: argument parsing and printing over repskip.pipeline."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import RepskipError
from .outputs import Terminated, atomic_dir, check_output, exit_cleanly_on_signals, write_atomic
from .progress import STATUS_NAME, Reporter

# Logs and pipes get a wide console, so tables are not cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class _Cli(click.Group):
    """Turns RepskipError into ``error: ...`` and exit code 1, with no traceback."""

    def invoke(self, ctx):
        warnings.showwarning = _one_line_warnings
        exit_cleanly_on_signals()  # SIGTERM / SIGHUP unwind like Ctrl-C: no half-written output
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        try:
            return super().invoke(ctx)
        except RepskipError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            ctx.exit(1)
        except Terminated as exc:
            err_console.print(f"[red]terminated ({exc}): nothing half-written was left[/]")
            ctx.exit(143)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted: nothing half-written was left[/]")
            ctx.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="repskip")
def main() -> None:
    """Measure how much each decoder layer changes the representation, turn that into a skip
    recipe, and physically remove the skipped layers.

    MODEL is a local checkpoint folder or a Hugging Face Hub id.
    """


def _float_list(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RepskipError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _key_values(pairs: tuple[str, ...], option: str = "--sampler-setting") -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RepskipError(f"{option} takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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


# What `analyze` does unless told otherwise: on SmolLM2-135M at k = 2, 4, 6, 8
# (docs/benchmarks.md, "Quality per layer removed") block-influence with a linear repair was
# the best or close to it at every k, while angular-block + repair, ahead at k = 4 and 6,
# collapsed at k = 8. A recipe file that names no strategy still means paper, so that old
# recipes keep their meaning.
DEFAULT_STRATEGY = "block-influence"
DEFAULT_REPAIR = "linear"


def _selection_options(f):
    opts = [
        click.option("--strategy", type=click.Choice(["paper", "block-influence", "angular-block", "loss", "greedy-loss"]),
                     default=DEFAULT_STRATEGY, show_default=True,
                     help="How layers are chosen: by similarity (paper, block-influence, angular-block) or by the "
                          "calibration loss a removal costs (loss: each layer alone; greedy-loss: one at a time, "
                          "SLEB). The loss strategies run the model; select reads the search analyze recorded. "
                          "The default (with --repair linear) was the most robust in docs/benchmarks.md."),
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
    from .recipe import SelectionSpec

    return SelectionSpec(
        strategy=strategy, k=k, threshold=threshold, allow_adjacent=allow_adjacent,
        protect_first=not no_protect_ends, protect_last=not no_protect_ends,
        protect=_protect_list(protect), positions=positions,
    )


def _write_analysis_outputs(out: Path, analysis, recipe, threshold, repair: bytes | None = None) -> None:
    from .analyze import plots
    from .analyze.selection import protected_layers
    from .repair.store import DEFAULT_NAME

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
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for analysis.json, recipe.yaml and the plots.")
@click.option("--calib", default=None,
              help="Calibration text: a .txt file (blank-line paragraphs) or .jsonl [default: built-in set].")
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
@click.option("--repair", type=click.Choice(["none", "linear"]), default=DEFAULT_REPAIR, show_default=True,
              help="linear: fit a least-squares map per removed run on the calibration text and fold it into the "
                   "MLP output projection of the layer in front (same architecture, no extra parameter); with a "
                   "loss strategy, candidates are scored repaired.")
@click.option("--objective", type=click.Choice(["nll", "kl"]), default="nll", show_default=True,
              help="loss strategies: the calibration loss (nll: the model's own; kl: to the full model's predictions).")
@click.option("--ridge", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="repair: ridge towards no repair, relative to the mean diagonal of M^T M.")
@click.option("--search-samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="loss strategies: calibration sequences each trial is scored on (the first of --num-samples); "
                   "the search costs about k x layers forward passes over them.")
@click.option("--dtype", default="auto", show_default=True, help="auto (as saved), float32, bfloat16, float16.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="When -o holds a finished analysis of the same model, calibration and settings, choose again "
                   "from it instead of measuring again.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists (measuring afresh).")
def analyze(model, output, calib, calib_field, num_samples, max_length, batch_size, positions, matrix_tokens, mode,
            mask_ratios, prompt_fraction, sampler_set, chat, strategy, k, threshold, allow_adjacent, protect,
            no_protect_ends, repair, objective, ridge, search_samples, dtype, device, seed, reuse, force):
    """Measure each layer of MODEL and write analysis.json, plots and a resolved recipe.yaml."""
    from . import pipeline
    from .recipe import CalibrationSpec, Recipe, resolve

    ratios = _float_list(mask_ratios, "--mask-ratios")
    sampler_settings = _key_values(sampler_set)
    spec = _selection_spec(strategy, k, threshold, allow_adjacent, protect, no_protect_ends, positions)
    spec = spec.model_copy(update=dict(mode=mode, mask_ratios=ratios, prompt_fraction=prompt_fraction,
                                       sampler=sampler_settings, chat=chat, repair=repair, objective=objective,
                                       ridge=ridge, search_samples=search_samples))
    cal = CalibrationSpec(source=calib or "builtin", field=calib_field, num_samples=num_samples,
                          max_length=max_length, batch_size=batch_size, seed=seed)
    pipeline.check_device_name(device)
    reporter = Reporter("analyze", console=err_console)
    reporter.say(f"opening {model}")
    handle = pipeline.open_model(model)
    # every refusal now, not after the analysis
    from .analyze.selection import LOSS_STRATEGIES, check_feasible

    check_feasible(handle.num_layers, strategy, k, allow_adjacent=allow_adjacent, protect_first=not no_protect_ends,
                   protect_last=not no_protect_ends, protect=spec.protect)
    if repair != "none":
        from .repair.fit import check_supported

        check_supported(handle.family, handle.ckpt.config)
    reused = None
    if reuse and not force and output.is_dir():
        reused = _reusable(output, handle, cal, mode, ratios, prompt_fraction, positions, matrix_tokens, dtype)
    if reused is None:
        check_output(output, force, [handle.path])
    saved_only = None  # the error to raise once the measurements are saved
    with atomic_dir(output, force or reused is not None, [handle.path], command="analyze") as tmp:
        reporter.move_status(tmp / STATUS_NAME)
        reporter.say(f"working in {tmp} ({output} appears when it is done)")
        torch_model = None
        if reused is None or strategy in LOSS_STRATEGIES or repair != "none":
            reporter.say(f"loading {handle.path.name} ({dtype}, {device})")
            torch_model = handle.load(dtype, device)
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
            from .analyze.reuse import search_matches

            request = {"strategy": strategy, "objective": objective, "repair": repair == "linear",
                       "sequences": min(search_samples, num_samples), "k": k,
                       **pipeline.search_request(handle, spec)}
            if search_matches(result.data.get("search"), request):
                reporter.say("reusing the loss search recorded in the analysis")
            else:
                with reporter.stage("searching", "batches") as update:
                    result.data["search"] = pipeline.loss_search(handle, torch_model, spec, cal, progress=update)
        unresolved = Recipe(selection=spec, calibration=cal)
        try:
            recipe = resolve(unresolved, result)
        except RepskipError as exc:
            # The measurements are still worth keeping: save them, then say how to choose again.
            _write_analysis_outputs(tmp, result, unresolved, threshold)
            recipe, saved_only = unresolved, exc
        maps_file = None
        if saved_only is None and repair == "linear":
            from .repair.store import DEFAULT_NAME

            with reporter.stage("fitting repair", "runs") as update:
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
    console.print(f"[bold]{strategy}[/] k={k}: remove layers [bold red]{recipe.resolved.remove}[/]")
    if recipe.resolved.repair:
        fits = ", ".join(f"layer {m.layer} <- {m.run[0]}..{m.run[1]}: {m.residual:.3f}" for m in recipe.resolved.repair.maps)
        console.print(f"linear repair, residual / plain removal: {fits}")
    console.print(f"wrote {output}/analysis.json, recipe.yaml, "
                  + ("repair.safetensors, " if maps_file else "")
                  + f"similarity.png, similarity_matrix.png, token_distance.png, {STATUS_NAME}")


def _reusable(output: Path, handle, cal, mode, ratios, prompt_fraction, positions, matrix_tokens, dtype):
    """The finished analysis in ``output`` when it measured what this run would (said on
    stderr either way), else None; a folder holding none is left to check_output."""
    from .analyze import reuse

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
    from .pipeline import parse_dtype

    return str(parse_dtype(name)).replace("torch.", "")


@main.command()
@click.argument("analysis_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Recipe YAML to write.")
@_selection_options
@click.option("--force", is_flag=True, help="Replace the recipe file if it exists.")
def select(analysis_file, output, strategy, k, threshold, allow_adjacent, protect, no_protect_ends, force):
    """Choose layers from an existing analysis.json without re-running the model."""
    from .analyze.analysis import Analysis
    from .recipe import Recipe, is_recipe_file, resolve

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


@main.command()
@click.argument("model")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="A resolved recipe, or an unresolved preset (resolved by running the analysis). Without one, "
                   "--format onnx exports MODEL as it is (a compressed or healed checkpoint).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: exported/<model>-skip<k>, plus -onnx for --format onnx].")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "onnx"]), default="safetensors", show_default=True,
              help="safetensors: a checkpoint from_pretrained loads; onnx: model.onnx for ONNX Runtime, checked "
                   "against PyTorch before it is kept.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="safetensors: largest output shard, e.g. 500MB.")
@click.option("--opset", type=int, default=18, show_default=True,
              help="onnx: ONNX opset, 18 up to the newest the installed torch writes (23 for torch 2.13).")
@click.option("--export-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="onnx: precision of the graph's weights and compute (bf16 needs --provider cuda).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="onnx: ONNX Runtime execution provider for the parity check.")
@click.option("--parity-tolerance", type=click.FloatRange(min=0), default=None,
              help="onnx: largest |ORT - PyTorch| logit difference accepted [default: by dtype, see docs/onnx.md].")
@click.option("--dtype", default="auto", show_default=True, help="dtype for the analysis of an unresolved recipe.")
@click.option("--device", default="cpu", show_default=True, help="Device for the analysis of an unresolved recipe.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def compress(model, recipe_path, output, fmt, max_shard_size, opset, export_dtype, provider, parity_tolerance,
             dtype, device, force):
    """Write MODEL without the recipe's layers: a safetensors checkpoint, or an ONNX graph."""
    from . import pipeline
    from . import recipe as recipe_mod
    from .compress.files import parse_size

    shard = parse_size(max_shard_size)
    pipeline.check_device_name(device)
    if recipe_path is None:
        if fmt != "onnx":
            raise RepskipError("compress needs --recipe (the layers to remove); only --format onnx exports a "
                               "model as it is")
        handle = pipeline.open_model(model)
        output = output or Path("exported") / f"{handle.path.name}-onnx"
        result = pipeline.export_as_is(handle, output, force=force, opset=opset, export_dtype=export_dtype,
                                       provider=provider, parity_tolerance=parity_tolerance,
                                       status=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
        _print_onnx_export(handle, result, output)
        return
    recipe = recipe_mod.load(recipe_path)
    handle = pipeline.open_model(model)
    if output is None:
        k = len(recipe.resolved.remove) if recipe.is_resolved else recipe.selection.k
        # a Hub id resolves to a snapshot folder named by its commit: name it after the repo
        name = Path(model).name if Path(model).exists() else model.rstrip("/").split("/")[-1]
        output = Path("exported") / (f"{name}-skip{k}" + ("-onnx" if fmt == "onnx" else ""))
    kwargs = dict(max_shard_size=shard, force=force, format=fmt, opset=opset, export_dtype=export_dtype,
                  provider=provider, parity_tolerance=parity_tolerance)
    if fmt == "onnx":
        kwargs["status"] = lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False)
    if recipe.is_resolved:
        result, resolved = pipeline.compress(handle, recipe, output, **kwargs)
    else:
        # refuse bad input before the progress bar and the analysis start
        pipeline.check_compress(recipe, output, force=force, format=fmt, opset=opset, export_dtype=export_dtype,
                                provider=provider, handle=handle)
        console.print(f"recipe {recipe_path} is unresolved: analysing {handle.path.name} to choose layers")
        with Reporter("compress", console=err_console).stage("analysing", "sequences") as update:
            result, resolved = pipeline.compress(handle, recipe, output, dtype=dtype, device=device, progress=update,
                                                 **kwargs)
    if fmt == "onnx":
        _print_onnx_export(handle, result, output)
        return
    table = Table(show_header=False, box=None)
    table.add_row("removed layers", str(result.removed))
    table.add_row("layers", f"{handle.num_layers} -> {len(result.kept)}")
    table.add_row("size", f"{result.bytes_in / 1e6:,.1f} MB -> {result.bytes_out / 1e6:,.1f} MB "
                          f"in {result.shards} shard(s)")
    table.add_row("copied", ", ".join(result.side_files) or "-")
    console.print(table)
    if handle.family.generative_kind == "autoregressive":
        console.print(f"wrote {output} (loads with AutoModelForCausalLM.from_pretrained)")
    else:
        console.print(f"wrote {output} (loads with repskip, and with the authors' code via trust_remote_code)")


def _print_onnx_export(handle, result, output) -> None:
    table = Table(title="parity: ONNX Runtime vs PyTorch", title_justify="left")
    for col in ("batch", "new tokens", "past", "padded rows", "max |diff| logits", "max |diff| present",
                "greedy flips"):
        table.add_column(col, justify="right")
    for c in result.parity:
        present = "-" if c.present_max_abs_diff is None else f"{c.present_max_abs_diff:.2e}"
        table.add_row(str(c.batch), str(c.length), str(c.past), str(c.padded_rows), f"{c.max_abs_diff:.2e}", present,
                      str(c.greedy_flips))
    console.print(table)
    summary = Table(show_header=False, box=None)
    summary.add_row("removed layers", str(result.removed))
    summary.add_row("layers", f"{handle.num_layers} -> {len(result.kept)}")
    summary.add_row("graph", f"{result.signature}, opset {result.opset}, {result.dtype}"
                             + (", external data" if result.external_data else ""))
    summary.add_row("size", f"{result.onnx_bytes / 1e6:,.1f} MB")
    summary.add_row("parity", f"max |diff| {result.max_abs_diff:.2e} <= tolerance {result.tolerance:.2e} "
                              f"on {result.provider.upper()}")
    console.print(summary)
    console.print(f"wrote {output} (runs with 'repskip generate {output}' or any ONNX Runtime)")


def _removed_for(handle, recipe_path, remove):
    from . import pipeline
    from . import recipe as recipe_mod

    if recipe_path and remove:
        raise RepskipError("give --recipe or --remove, not both")
    if remove:
        try:
            return [int(x) for x in remove.split(",") if x.strip()]
        except ValueError:
            raise RepskipError(f"--remove takes comma-separated layer indices, got {remove!r}") from None
    if recipe_path:
        return pipeline.removed_layers(recipe_mod.load(recipe_path), handle)
    return []


@main.command()
@click.argument("model")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None, help="A resolved recipe.")
@click.option("--remove", default=None, help="Layers to remove, e.g. 3,5,7 (instead of --recipe).")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens in the forward pass.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generation figure: prompt tokens.")
@click.option("--gen-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generation figure: generated tokens.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Generation figure, diffusion: denoising steps [default: --gen-len].")
@click.option("--cfg", is_flag=True, help="Generation figure, diffusion: classifier-free guidance doubles each pass.")
@click.option("--block-length", type=click.IntRange(min=1), default=None,
              help="Generation figure, LLaDA: logits are computed for the current block only [default: --gen-len].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema-versioned) instead of a table.")
def flops(model, recipe_path, remove, seq_len, prompt_len, gen_len, steps, cfg, block_length, as_json):
    """Analytic FLOPs of MODEL before and after removing layers: one forward pass, and a
    whole generation (KV-cache decoding for autoregressive models, full-sequence denoising
    steps for diffusion models)."""
    from . import pipeline
    from .flops import COMPONENTS, generation_flops

    handle = pipeline.open_model(model, allow_onnx=True)
    kind = handle.family.generative_kind
    if kind == "autoregressive" and (steps is not None or cfg or block_length is not None):
        raise RepskipError("--steps, --cfg and --block-length describe diffusion sampling; this model is autoregressive")
    removed = _removed_for(handle, recipe_path, remove)
    cmp = pipeline.flops(handle, removed, seq_len)
    geo = handle.family.geometry(handle.ckpt.config)
    gen = {name: generation_flops(geo, kind, prompt_len, gen_len, steps=steps, cfg=cfg, layers=layers,
                                  logits_per_pass=block_length)
           for name, layers in (("base", geo.layers), ("pruned", geo.layers - len(removed)))}
    gen_cut = 1 - gen["pruned"].total / gen["base"].total
    if as_json:
        click.echo(json.dumps({"schema_version": 1, "kind": "repskip.flops", "model": str(handle.path),
                               "removed": removed, **cmp.to_dict(),
                               "generation": {"base": gen["base"].to_dict(), "pruned": gen["pruned"].to_dict(),
                                              "cfg": cfg, "reduction": gen_cut}}, indent=1))
        return
    table = Table(title=f"FLOPs of one {seq_len}-token forward ({handle.path.name})")
    for col in ("component", "base GFLOPs", "pruned GFLOPs"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for name in COMPONENTS:
        table.add_row(name, f"{cmp.base.components[name] / 1e9:,.3f}", f"{cmp.pruned.components[name] / 1e9:,.3f}")
    table.add_row("[bold]total", f"[bold]{cmp.base.total / 1e9:,.3f}", f"[bold]{cmp.pruned.total / 1e9:,.3f}")
    console.print(table)
    console.print(f"removed {len(removed)} of {cmp.base.layers} layers {removed}")
    console.print(f"paper's figure (skipped / total layers): [bold]{cmp.layer_fraction:.2%}[/]")
    console.print(f"exact reduction per token, {seq_len}-token forward incl. LM head: "
                  f"[bold]{cmp.forward_reduction:.2%}[/] ({cmp.base.per_token / 1e6:,.1f} -> "
                  f"{cmp.pruned.per_token / 1e6:,.1f} MFLOPs/token)")
    if kind == "autoregressive":  # a diffusion model has no KV-cache decode step
        console.print(f"exact reduction per generated token (decode at context {seq_len + 1}): "
                      f"[bold]{cmp.decode_reduction:.2%}[/]")
    g = gen["base"]
    regime = (f"{g.forward_passes} full-sequence denoising passes{' with CFG' if cfg else ''}"
              if kind == "diffusion" else "prefill + KV-cache decoding")
    console.print(f"generating {gen_len} tokens after a {prompt_len}-token prompt ({regime}): "
                  f"{g.per_generated_token / 1e9:,.3f} -> {gen['pruned'].per_generated_token / 1e9:,.3f} "
                  f"GFLOPs per generated token, [bold]{gen_cut:.2%}[/] less")


@main.command()
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option("--sampler", default=None, help="Sampler plugin [default: the family's: ar, llada or dream].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="ar, dream: tokens to generate [64 / 128].")
@click.option("--gen-length", type=click.IntRange(min=1), default=None, help="llada: tokens to generate [128].")
@click.option("--block-length", type=click.IntRange(min=1), default=None, help="llada: semi-autoregressive block [32].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="llada, dream: denoising steps [128].")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="0 = greedy / argmax [0].")
@click.option("--top-p", type=click.FloatRange(0, 1), default=None, help="ar, dream: nucleus sampling.")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="ar, dream: top-k sampling.")
@click.option("--cfg-scale", type=click.FloatRange(min=0), default=None, help="llada: classifier-free guidance [0].")
@click.option("--remasking", type=click.Choice(["low_confidence", "random"]), default=None, help="llada [low_confidence].")
@click.option("--alg", type=click.Choice(["origin", "maskgit_plus", "topk_margin", "entropy"]), default=None,
              help="dream: which masked positions to reveal [entropy].")
@click.option("--alg-temp", type=click.FloatRange(min=0), default=None, help="dream: sample positions instead of top-n.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other sampler setting, e.g. eps=0.001 or logits_eos_inf=true (repeatable).")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the chat template if there is one.")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="PyTorch checkpoints: cpu, cuda, cuda:N or auto.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX exports: ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu and a GPU are "
                   "present, else CPU).")
@click.option("--seed", type=int, default=0, show_default=True)
def generate(model, prompts, sampler, extra, chat, dtype, device, provider, seed, **settings):
    """Load MODEL (a checkpoint, or an exported one: safetensors or ONNX) and continue
    prompts with its sampler."""
    from . import pipeline
    from .sampler import format_prompt, get_sampler

    handle = pipeline.open_model(model, allow_onnx=True)
    fam = handle.family
    smp = get_sampler(sampler or fam.default_sampler, fam)
    given = {**{k: v for k, v in settings.items() if v is not None}, **_key_values(extra, "--set")}
    smp.settings(given)  # reject a setting this sampler does not take before loading anything
    torch_model = handle.load(dtype, device, provider=provider)
    tokenizer = fam.load_tokenizer(handle.path)
    texts = [format_prompt(tokenizer, p, chat) for p in prompts]
    out = smp.generate(torch_model, tokenizer, texts, family=fam, seed=seed, **given)
    for prompt, text in zip(prompts, out.texts):
        console.print(f"[bold cyan]> {prompt}[/]")
        console.print(text, highlight=False)
    runtime = f"ONNX Runtime {torch_model.session.provider.upper()}" if handle.onnx else "PyTorch"
    console.print(f"[dim]{handle.num_layers} layers, {out.forward_passes} forward passes, "
                  f"sampler {sampler or fam.default_sampler}, {runtime}[/]")


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
@click.option("--device-map", default=None, help="Spread a model too big for one device, e.g. auto (HF decoders).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="COMPRESSED as an ONNX export: ONNX Runtime execution provider.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--allow-unsafe-code-execution", "allow_unsafe", is_flag=True,
              help="Where the sandbox's OS isolation is unavailable, run HumanEval / MBPP code without it (only on a "
                   "machine you can afford to lose; see docs/verify.md).")
@click.option("--speed-repeats", type=click.IntRange(min=0), default=5, show_default=True,
              help="Alternating timed runs of each model for the speed comparison (0: none).")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True,
              help="perplexity: tokens of each item scored (the rest is not read); never more than the model's "
                   "context length.")
def verify(base, compressed, recipe_path, benches, data, limit, min_retention, output, overrides, bench_opts, presets,
           sampler, batch_size, chat, dtype, device, device_map, provider, seed, allow_unsafe, speed_repeats,
           max_length):
    """Compare COMPRESSED (or BASE with --recipe) against BASE on benchmarks: retention with a
    95% confidence interval and a paired test, FLOPs reduction and measured speed. COMPRESSED
    may be a safetensors checkpoint or an ONNX export (run on ONNX Runtime)."""
    from .verify import run as verify_mod
    from .pipeline import check_device_name

    check_device_name(device)
    names = [b.strip() for b in benches.split(",") if b.strip()]
    reporter = Reporter("verify", console=err_console, status=output / STATUS_NAME)
    update, close = reporter.tracker("items")
    try:
        report = verify_mod.verify(
            base, compressed, recipe=recipe_path, benches=names, data=_data_map(data), limit=limit, output=output,
            batch_size=batch_size, chat=chat, seed=seed, sampler=sampler, overrides=_key_values(overrides, "--set"),
            presets=presets, bench_options=_bench_options(bench_opts),
            dtype=None if dtype == "auto" else dtype, device=device, device_map=device_map, provider=provider,
            allow_unsafe_code_execution=allow_unsafe, progress=update, say=reporter.say, speed_repeats=speed_repeats,
            max_length=max_length,
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
        if verify_mod.cut_note(e):
            console.print(f"[yellow]{name}[/]: {escape(verify_mod.cut_note(e))}", highlight=False)
        if e.get("uninformative"):
            console.print(f"[yellow]{name}: uninformative[/]: {escape(e['uninformative_why'])}"
                          + escape(verify_mod.items_needed_note(e)), highlight=False)
    for line in verify_mod.speed_lines(report.get("speed")):
        console.print(escape(line), highlight=False)
    console.print(f"wrote {output}/report.json and report.md")
    if min_retention is not None:
        failed = verify_mod.failing(report, min_retention)
        if failed:
            err_console.print(f"[red]retention below {min_retention} on: {', '.join(failed)}[/]")
            sys.exit(1)


@main.command("lm-eval")
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
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the results as JSON (kind repskip.lm-eval: lm-eval's results under 'results').")
@click.option("--batch-size", default="8", show_default=True,
              help="Requests per forward pass for log-likelihoods (sorted by length; choices sharing a context run "
                   "it once), or auto: as many as fit 4096 padded tokens (32768 on CUDA).")
@click.option("--force", is_flag=True, help="Replace the -o file if an earlier 'repskip lm-eval' wrote it.")
def lm_eval_command(model, tasks, recipe_path, include_path, limit, num_fewshot, model_args, dtype, device, output,
                    batch_size, force):
    """Run lm-evaluation-harness tasks on MODEL (needs the lm-eval extra)."""
    if output is not None:
        check_output(output, force, [Path(model)], file=True, owned=_is_lm_eval_results)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RepskipError("lm-eval is not installed: pip install 'repskip[lm-eval]'") from None
    from .verify.lmeval import RepskipLM

    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise RepskipError(f"--batch-size takes a positive number or auto, got {batch_size!r}")
    lm = RepskipLM(pretrained=model, recipe=str(recipe_path) if recipe_path else None, dtype=dtype, device=device,
                   batch_size=batch_size, **_key_values(model_args, "--model-arg"))
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json):
    """List the installed family, sampler and benchmark plugins."""
    from . import registry

    rows = [p for group in registry.GROUPS for p in registry.plugins(group)]
    if as_json:
        click.echo(json.dumps({"schema_version": 1, "kind": "repskip.plugins", "plugins": [
            {"group": p.group, "name": p.name, "target": p.target, "distribution": p.distribution,
             "version": p.version, "ok": p.ok, "error": p.error} for p in rows]}, indent=1))
        return
    table = Table(title="repskip plugins")
    for col in ("group", "name", "distribution", "version", "status"):
        table.add_column(col)
    for group in registry.GROUPS:
        found = [p for p in rows if p.group == group]
        if not found:
            table.add_row(group, "[dim]none installed[/]", "", "", "")
        for p in found:
            status = "[green]ok[/]" if p.ok else f"[red]failed: {p.error}[/]"
            table.add_row(group, p.name, p.distribution, p.version, status)
    console.print(table)


@main.command()
@click.argument("model")
@click.option("--teacher", default=None, help="The model MODEL was cut from: distil from it (--loss kd or mix).")
@click.option("--data", required=True,
              help="Training text: a text file, a folder of .txt/.md/.jsonl files, a .jsonl file, or hub:DATASET[:CONFIG].")
@click.option("--text-field", default=None, help="JSONL / Hub dataset field holding the text [default: text].")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Folder of the healed checkpoint.")
@click.option("--method", type=click.Choice(["lora", "full"]), default="lora", show_default=True,
              help="lora: LoRA adapters merged into the weights at the end; full: train the chosen layers' weights.")
@click.option("--layers", default="around-cuts", show_default=True,
              help="Layers that train: around-cuts (the kept layers next to each cut, from the input's recipe), "
                   "all, or comma-separated indices.")
@click.option("--around", type=int, default=1, show_default=True, help="around-cuts: kept layers on each side of a cut.")
@click.option("--train-embeddings", is_flag=True,
              help="--method full: also train the parameters outside the decoder layers (embeddings, final norm, "
                   "output head); with --layers all, the whole model.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=32.0, show_default=True, help="LoRA alpha (scale = alpha / rank).")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--loss", type=click.Choice(["kd", "lm", "mix"]), default=None,
              help="kd: distil the teacher's predictions; lm: the family's own training loss; mix: both "
                   "[default: kd with --teacher, else lm].")
@click.option("--kd-weight", type=float, default=0.5, show_default=True, help="mix: weight of kd against lm.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="kd: softmax temperature.")
@click.option("--steps", type=int, default=300, show_default=True, help="Optimiser steps.")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 2e-4 for lora, 2e-5 for full].")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per micro-batch (per process).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimiser step.")
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Warm-up, as a fraction of the steps.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per packed training sequence.")
@click.option("--eval-sequences", type=int, default=16, show_default=True,
              help="Sequences held out from the end of the data for the evaluation loss.")
@click.option("--eval-every", type=int, default=50, show_default=True, help="Steps between evaluations.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Steps between resumable states.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue a killed heal of the same settings from its last state.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast compute (fp32 master weights).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (several GPUs: accelerate launch).")
@click.option("--threads", type=int, default=0, help="CPU threads for torch [default: torch's choice].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--force", is_flag=True, help="Replace the output folder if repskip wrote it.")
def heal(model, teacher, data, text_field, output, method, layers, around, train_embeddings, rank, lora_alpha,
         lora_dropout, loss, kd_weight, temperature, steps, lr, batch_size, grad_accum, warmup, weight_decay, seq_len,
         eval_sequences, eval_every, save_every, resume, precision, device, threads, seed, max_shard_size, force):
    """Train a compressed MODEL for a short while to recover what removal cost (LoRA or
    full fine-tuning of the layers next to each cut, distilled from --teacher)."""
    from . import pipeline
    from .compress.files import parse_size
    from .train.heal import HealSettings, heal as heal_run

    pipeline.check_device_name(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    settings = HealSettings(
        method=method, layers=layers, around=around, train_embeddings=train_embeddings, rank=rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        loss=loss or ("kd" if teacher else "lm"), kd_weight=kd_weight, temperature=temperature, steps=steps,
        lr=lr if lr is not None else (2e-4 if method == "lora" else 2e-5), batch_size=batch_size,
        grad_accum=grad_accum, warmup=warmup, weight_decay=weight_decay, seq_len=seq_len,
        eval_sequences=eval_sequences, precision=precision, seed=seed)
    settings.check()
    shard = parse_size(max_shard_size)
    reporter = Reporter("heal", console=err_console)
    update, close = reporter.tracker("steps")  # the bar starts with the first step, after loading
    try:
        result = heal_run(model, output, data=data, teacher=teacher, settings=settings, text_field=text_field,
                          eval_every=eval_every, save_every=save_every, resume=resume, force=force,
                          device=device, max_shard_size=shard, say=reporter.say,
                          progress=lambda done, total, detail: update("training", done, total, detail))
    finally:
        close()
    if not result.wrote:  # another process of an accelerate / torchrun launch: the main one reports
        return
    record = result.record
    table = Table(show_header=False, box=None)
    table.add_row("trained", f"{settings.method} on layers {result.layers}, "
                             f"{record['trainable_parameters']:,} parameters, {len(record['tensors'])} tensors written")
    ev = record["history"]["eval"]
    if ev:
        keys = [k for k in ev[0] if k != "step"]
        table.add_row("held-out", "; ".join(f"{k} {ev[0][k]:.4f} -> {ev[-1][k]:.4f}" for k in keys))
    table.add_row("time", f"{record['seconds']:.0f} s" + (f" (resumed at step {record['resumed_from']})"
                                                         if record["resumed_from"] else ""))
    table.add_row("check", f"reloaded logits match the trained model's (max diff {record['written_max_logit_diff']:.2g})")
    console.print(table)
    console.print(f"wrote {output} (same architecture as {model}; training record in {output / 'heal.json'})")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--label", "labels", multiple=True, help="Name of each model, in the order they first appear (repeat).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("runs/compare"), show_default=True,
              help="Folder for the figures and compare.json.")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json to stdout instead of the table.")
@click.option("--force", is_flag=True, help="Replace the output folder if repskip wrote it.")
def compare(runs, labels, output, as_json, force):
    """Overlay the analyses and verify reports of several models (RUNS: analyze or verify
    output folders, or their JSON files): one figure per view they all have, one table."""
    from . import __version__
    from .compare import common_views, load_series, summary, write_figures

    series = load_series(list(runs), list(labels) or None)
    views = common_views(series)
    check_output(output, force, list(runs))
    rows = summary(series, views)
    record = {"schema_version": 1, "kind": "repskip.compare", "repskip": __version__, "views": views,
              "runs": [str(r) for r in runs], "models": rows}
    with atomic_dir(output, force, list(runs), command="compare") as tmp:
        figures = write_figures(series, views, tmp)
        record["figures"] = figures
        (tmp / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(record, indent=1))
        return
    table = Table(title=f"Compared: {', '.join(views)}")
    for col in ("model", "family", "layers", "mean cos", "cos >= 0.95", "most redundant (depth)", "retention"):
        table.add_column(col)
    for row in rows:
        most = ", ".join(f"{m['layer']} ({m['depth']:.2f})" for m in row.get("most_redundant", []))
        ret = "; ".join(f"k={p['removed']}: " + ", ".join(f"{b} {v['retention']:.3f}" for b, v in p["benchmarks"].items())
                        for p in row.get("retention", []))
        table.add_row(row["label"], f"{row['family']} ({row['kind']})", str(row.get("layers", "-")),
                      f"{row['mean_cosine']:.4f}" if "mean_cosine" in row else "-",
                      f"{row['redundant_share']:.0%}" if "redundant_share" in row else "-", most or "-", ret or "-")
    console.print(table)
    console.print(f"wrote {output}: {', '.join(figures)}, compare.json")


@main.command("fetch-default")
def fetch_default():
    """Fetch and convert the embedded default model (SmolLM2-135M-Instruct); print its folder."""
    from .default_model import ensure_default_model

    path = ensure_default_model(say=lambda s: err_console.print(f"[dim]{s}[/]"))
    click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
