"""repskip heal: train a compressed model for a short while to recover what removal cost."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..progress import Reporter
from .app import console, err_console, main, trust_remote_code_option


@main.command()
@trust_remote_code_option
@click.argument("model")
@click.option("--teacher", default=None, help="The model MODEL was cut from: distil from it (--loss kd or mix).")
@click.option("--data", required=True,
              help="Training text: a text file, a folder of .txt/.md/.jsonl files, a .jsonl file, python-stdlib (the "
                   "Python standard library's source, for code models), or hub:DATASET[:CONFIG].")
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
@click.option("--fsdp", is_flag=True,
              help="Shard the model, its gradients and optimiser moments over the processes of a torchrun or "
                   "accelerate launch (torch FSDP2), for a model that fits no single device.")
@click.option("--threads", type=int, default=0, help="CPU threads for torch [default: torch's choice].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--force", is_flag=True, help="Replace the output folder if repskip wrote it.")
def heal(model, teacher, data, text_field, output, method, layers, around, train_embeddings, rank, lora_alpha,
         lora_dropout, loss, kd_weight, temperature, steps, lr, batch_size, grad_accum, warmup, weight_decay, seq_len,
         eval_sequences, eval_every, save_every, resume, precision, device, fsdp, threads, seed, max_shard_size, force):
    """Train a compressed MODEL for a short while to recover what removal cost (LoRA or
    full fine-tuning of the layers next to each cut, distilled from --teacher)."""
    from .. import pipeline
    from ..compress.files import parse_size
    from ..train.heal import HealSettings, heal as heal_run

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
                          device=device, fsdp=fsdp, max_shard_size=shard, say=reporter.say,
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
    resumed = record["resumed_from"]
    table.add_row("time", f"{record['seconds']:.0f} s of training" + (
        f" ({record['seconds_this_run']:.0f} s of them in this run, resumed at step {resumed})" if resumed else ""))
    table.add_row("check", f"reloaded logits match the trained model's (max diff {record['written_max_logit_diff']:.2g})")
    console.print(table)
    console.print(f"wrote {output} (same architecture as {model}; training record in {output / 'heal.json'})")
