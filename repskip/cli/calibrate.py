"""repskip self-calibrate: the model's own answers to prompts, as a calibration file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import RepskipError
from ..outputs import check_output, write_atomic
from ..progress import Reporter
from .app import console, err_console, main, trust_remote_code_option

FIELDS = ("text", "prompt", "response")


def _ours(path: Path) -> bool:
    """Whether ``path`` is a file self-calibrate wrote (for --force): JSON lines of its records."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return sorted(json.loads(first)) == sorted(FIELDS)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


@main.command("self-calibrate")
@trust_remote_code_option
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="JSON-lines file to write: one record per prompt (text, prompt, response).")
@click.option("--prompts", default=None,
              help="Prompts: a .txt file (blank-line paragraphs) or .jsonl [default: 48 built-in prompts: "
                   "explanations, code, arithmetic].")
@click.option("--prompt-field", default=None, help="JSONL field holding the prompt [default: the first of text, "
                                                    "question, prompt, problem, content].")
@click.option("--num-samples", type=click.IntRange(min=1), default=48, show_default=True,
              help="Prompts to answer (a seeded sample when there are more).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Put each prompt through the chat template, when the model has one.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy answers; above: sampled under --seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (as saved), float32, bfloat16, float16.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace the output file if self-calibrate wrote it.")
def self_calibrate(model, output, prompts, prompt_field, num_samples, max_new_tokens, chat, temperature, batch_size,
                   dtype, device, seed, force):
    """Write MODEL's own answers to prompts as a calibration file for --calib (and heal --data).

    The model's own generations are calibration text that matches its use: a repair fitted on
    them, or a choice scored on them, follows what the model does when it answers."""
    from .. import pipeline
    from ..analyze import self_calibration

    pipeline.check_device_name(device)
    handle = pipeline.open_model(model)
    check_output(output, force, [handle.path], file=True, owned=_ours)
    chosen, label = self_calibration.pick_prompts(prompts, prompt_field, num_samples, seed)
    if not chosen:
        raise RepskipError(f"the prompts source {label} holds no prompt")
    reporter = Reporter("self-calibrate", console=err_console)
    reporter.say(f"loading {handle.path.name} ({dtype}, {device})")
    torch_model = handle.load(dtype, device)
    tokenizer = handle.family.load_tokenizer(handle.path)
    with reporter.stage("answering", "prompts", total=len(chosen)) as update:
        records = self_calibration.generate(torch_model, handle.family, tokenizer, chosen, max_new_tokens=max_new_tokens,
                                            chat=chat, temperature=temperature, seed=seed, batch_size=batch_size,
                                            progress=update)
    write_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    reporter.finish("done")
    words = sum(len(r["response"].split()) for r in records)
    console.print(f"wrote {output}: {len(records)} answers ({words} words) by {handle.path.name} to prompts from {label}; "
                  f"use it with --calib {output} (analyze) or --data {output} (heal)")
