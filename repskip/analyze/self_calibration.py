"""Self-calibration: the model's own responses to prompts, as calibration and healing text.

Calibration text decides what a repair map is fitted to and which layers a loss-aware choice
keeps; text unlike what the model will be asked to do fits the model to the wrong task
(ReplaceMe measured instruction data ahead of web text). The model's own answers are the text
closest to its use: each prompt (from the user's data, or the 48 built-in ones of
``repskip/data/prompts.txt``: explanations, code, arithmetic word problems) goes through the
chat template when the model has one, the family's sampler answers it (greedy by default;
with a temperature, sampled under the seed), and the record keeps the formatted prompt and
the answer as one ``text``. Written as JSON lines, the file is a calibration source like any
other (``--calib``, its tokens hashed into the recipe) and healing data (``heal --data``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

BUILTIN_PROMPTS = "builtin-prompts"


def builtin_prompts() -> list[str]:
    from .calibration import _paragraphs

    return _paragraphs(resources.files("repskip").joinpath("data/prompts.txt").read_text("utf-8"))


def pick_prompts(source: str | None, field: str | None, num_samples: int, seed: int) -> tuple[list[str], str]:
    """Up to ``num_samples`` prompts from ``source`` (a .txt or .jsonl file; None: the built-in
    ones), a seeded sample when there are more, in a fixed order."""
    import random

    from .calibration import pick_texts

    if source is None or source == BUILTIN_PROMPTS:
        prompts = builtin_prompts()
        if len(prompts) > num_samples:
            prompts = random.Random(seed).sample(prompts, num_samples)
        return prompts, BUILTIN_PROMPTS
    return pick_texts(source, field=field, num_samples=num_samples, seed=seed)


def generate(model: Any, family: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, chat: bool,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
             progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One record per prompt: ``text`` (the prompt as the model saw it, then its answer),
    ``prompt`` and ``response``."""
    from ..sampler import format_prompt, get_sampler

    sampler = get_sampler(family.default_sampler, family)
    length_key = "max_new_tokens" if "max_new_tokens" in sampler.defaults else "gen_length"
    settings = {length_key: max_new_tokens, "batch_size": batch_size}
    if "temperature" in sampler.defaults:
        settings["temperature"] = temperature
    settings = {key: value for key, value in settings.items() if key in sampler.defaults}
    records = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        formatted = [format_prompt(tokenizer, p, chat) for p in chunk]
        out = sampler.generate(model, tokenizer, formatted, family=family, seed=seed + start, **settings)
        for prompt, shown, response in zip(chunk, formatted, out.texts):
            records.append({"text": shown + response, "prompt": prompt, "response": response})
        if progress:
            progress(len(records), len(prompts))
    return records
