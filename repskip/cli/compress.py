"""repskip compress, flops and generate: write the model without the removed layers, count
what that saves, and run what was written."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import RepskipError
from ..progress import Reporter
from .app import _key_values, console, err_console, main, spread_options, trust_remote_code_option


@main.command()
@trust_remote_code_option
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
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="onnx, fp32: int8 weights for every MatMul with a constant weight (ONNX Runtime's MatMulNBits), "
                   "kept if the int8 graph still gives PyTorch's greedy tokens (see docs/onnx.md).")
@click.option("--dtype", default="auto", show_default=True, help="dtype for the analysis of an unresolved recipe.")
@click.option("--device", default="cpu", show_default=True, help="Device for the analysis of an unresolved recipe.")
@click.option("--offload", type=click.Choice(["auto", "none", "sequential"]), default="auto", show_default=True,
              help="For the analysis of an unresolved recipe, as for 'repskip analyze': sequential runs one decoder "
                   "layer at a time from disk, none loads the model whole, auto chooses by the memory free.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="For the analysis of an unresolved recipe: memory it may use (e.g. 12GB) [default: what is "
                   "available].")
@click.option("--offload-folder", type=click.Path(path_type=Path), default=None,
              help="For the analysis of an unresolved recipe: where a fresh scratch folder goes (removed afterwards).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def compress(model, recipe_path, output, fmt, max_shard_size, opset, export_dtype, provider, parity_tolerance,
             quantize, dtype, device, offload, max_memory, offload_folder, force):
    """Write MODEL without the recipe's layers: a safetensors checkpoint, or an ONNX graph."""
    from .. import pipeline
    from .. import recipe as recipe_mod
    from ..compress.files import parse_size
    from ..compress.quantize import check_quantize

    check_quantize(quantize, fmt, export_dtype)
    shard = parse_size(max_shard_size)
    pipeline.check_device_name(device)
    if recipe_path is None:
        if fmt != "onnx":
            raise RepskipError("compress needs --recipe (the layers to remove); only --format onnx exports a "
                               "model as it is")
        handle = pipeline.open_model(model)
        output = output or Path("exported") / f"{handle.path.name}-onnx"
        result = pipeline.export_as_is(handle, output, force=force, opset=opset, export_dtype=export_dtype,
                                       provider=provider, parity_tolerance=parity_tolerance, quantize=quantize,
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
                  provider=provider, parity_tolerance=parity_tolerance, quantize=quantize)
    if fmt == "onnx":
        kwargs["status"] = lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False)
    maps = None
    if not recipe.is_resolved:
        # a step of its own: choose the layers (and fit the repair) first; every refusal
        # comes before the progress bar and the analysis start
        pipeline.check_compress(recipe, output, force=force, format=fmt, opset=opset, export_dtype=export_dtype,
                                provider=provider, handle=handle, quantize=quantize)
        budget = parse_size(max_memory) if max_memory is not None else None
        tokens = recipe.calibration.num_samples * recipe.calibration.max_length
        pipeline.offload_plan(handle, offload, dtype, device, tokens, budget, offload_folder)
        run = dict(dtype=dtype, device=device, offload=offload, max_memory=budget, offload_folder=offload_folder)
        console.print(f"recipe {recipe_path} is unresolved: analysing {handle.path.name} to choose layers")
        reporter = Reporter("compress", console=err_console)
        with reporter.stage("analysing", "sequences") as update:
            recipe, _, maps = pipeline.resolve_recipe(recipe, handle, progress=update, say=reporter.say, **run)
    result, resolved = pipeline.compress(handle, recipe, output, maps=maps, **kwargs)
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
    q = result.quantization
    summary.add_row("graph", f"{result.signature}, opset {result.opset}, {result.dtype}"
                             + (f", int8 weights in {q.quantized_nodes} MatMuls" if q else "")
                             + (", external data" if result.external_data else ""))
    summary.add_row("size", f"{q.bytes_before / 1e6:,.1f} MB fp32 -> {q.bytes_after / 1e6:,.1f} MB int8" if q
                    else f"{result.onnx_bytes / 1e6:,.1f} MB")
    summary.add_row("parity", f"max |diff| {result.max_abs_diff:.2e} <= tolerance {result.tolerance:.2e} "
                              f"on {result.provider.upper()}" + (" (the fp32 graph)" if q else ""))
    if q:
        t = q.thresholds
        summary.add_row("int8 check", f"greedy agreement {q.agreement:.1%} >= {t['min_agreement']:.0%}, max |diff| "
                                      f"{q.max_relative_diff:.3f} <= {t['max_relative_diff']:g} of the logit scale")
    console.print(summary)
    console.print(f"wrote {output} (runs with 'repskip generate {output}' or any ONNX Runtime)")


def _removed_for(handle, recipe_path, remove):
    from .. import pipeline
    from .. import recipe as recipe_mod

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
@trust_remote_code_option
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
    from .. import pipeline
    from ..flops import generation_flops

    handle = pipeline.open_model(model, allow_onnx=True)
    kind = handle.family.generative_kind
    if kind == "autoregressive" and (steps is not None or cfg or block_length is not None):
        raise RepskipError("--steps, --cfg and --block-length describe diffusion sampling; this model is autoregressive")
    removed = _removed_for(handle, recipe_path, remove)
    cmp = pipeline.flops(handle, removed, seq_len)
    cost = handle.family.cost(handle.ckpt.config)
    kept = [i for i in range(cost.num_layers) if i not in set(removed)]
    gen = {name: generation_flops(cost, kind, prompt_len, gen_len, steps=steps, cfg=cfg, layers=layers,
                                  logits_per_pass=block_length)
           for name, layers in (("base", None), ("pruned", kept))}
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
    for name, value in cmp.base.components.items():
        table.add_row(name, f"{value / 1e9:,.3f}", f"{cmp.pruned.components.get(name, 0) / 1e9:,.3f}")
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
@trust_remote_code_option
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
@spread_options
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX exports: ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu and a GPU are "
                   "present, else CPU).")
@click.option("--seed", type=int, default=0, show_default=True)
def generate(model, prompts, sampler, extra, chat, dtype, device, device_map, max_memory, offload_folder, provider,
             seed, **settings):
    """Load MODEL (a checkpoint, or an exported one: safetensors or ONNX) and continue
    prompts with its sampler."""
    from .. import pipeline
    from ..sampler import format_prompt, get_sampler

    handle = pipeline.open_model(model, allow_onnx=True)
    fam = handle.family
    smp = get_sampler(sampler or fam.default_sampler, fam)
    given = {**{k: v for k, v in settings.items() if v is not None}, **_key_values(extra, "--set")}
    smp.settings(given)  # reject a setting this sampler does not take before loading anything
    from ..compress.files import parse_size
    from ..engine.offload import spread_folder

    budget = parse_size(max_memory) if max_memory is not None else None
    with spread_folder(device_map, budget, offload_folder, handle.path) as scratch:
        big = {"offload_folder": scratch, "max_memory": budget} if device_map else {}
        torch_model = handle.load(dtype, device, device_map=device_map, provider=provider, **big)
        tokenizer = fam.load_tokenizer(handle.path)
        texts = [format_prompt(tokenizer, p, chat) for p in prompts]
        out = smp.generate(torch_model, tokenizer, texts, family=fam, seed=seed, **given)
    for prompt, text in zip(prompts, out.texts):
        console.print(f"[bold cyan]> {prompt}[/]")
        console.print(text, highlight=False)
    runtime = f"ONNX Runtime {torch_model.session.provider.upper()}" if handle.onnx else "PyTorch"
    console.print(f"[dim]{handle.num_layers} layers, {out.forward_passes} forward passes, "
                  f"sampler {sampler or fam.default_sampler}, {runtime}[/]")
