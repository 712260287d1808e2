"""MBPP (Austin et al. 2021): short Python tasks, each with three assert tests.

Items: the standard test split, task_ids 11-510 (500 tasks), from the full mbpp.jsonl (a file
of other tasks only is an error). Few-shot examples: task_ids 2, 3, 4 from the same file, the
3-shot prompt of the paper (``shots`` 0-3 takes the first ones); from the Hub, openai's
"prompt" split (task_ids 1-10) holds them.

Prompt (the paper's format, as lm-eval's ``mbpp`` task uses it)::

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test 1}
    {test 2}
    {test 3}
    [BEGIN]
    {code}
    [DONE]

with the item's own block ending at ``[BEGIN]\\n``; the model writes code, then ``[DONE]`` (the
stop string). With a chat template: the task and tests as the user's message, the assistant's
turn opened with ```python, stopped at the closing fence.

Score: ``pass@1``: the code (``[BEGIN]``/``[DONE]`` and Markdown fences removed) +
test_setup_code + the three asserts, run in repskip's sandbox (option ``timeout_s``, default 10).
"""

from __future__ import annotations

import builtins
import keyword
import re
from pathlib import Path
from typing import Any

from repskip.benchmark import Item
from repskip.errors import RepskipError

from . import sources
from .common import BaseBenchmark, as_float, as_int, cut_at_stops, fenced_code, passes

HUB_REPO = "google-research-datasets/mbpp"
HUB_FILES = {"test": "full/test-00000-of-00001.parquet", "prompt": "full/prompt-00000-of-00001.parquet"}
TEST_IDS = range(11, 511)
SHOT_IDS = (2, 3, 4)

_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\s*\(")
_FENCE_LINE = re.compile(r"^[ \t]*```", re.M)


def task_text(text: str, tests: list[str]) -> str:
    return (f"You are an expert Python programmer, and here is your task: {text} "
            "Your code should pass these tests:\n\n" + "\n".join(tests) + "\n")


def tested_function(tests: list[str]) -> str | None:
    """The function under test: the first name the asserts call that is not a builtin, else
    the first name they call (a task may shadow a builtin: ``def sum(a, b)``)."""
    called = [n for test in tests for n in _CALL.findall(test) if not keyword.iskeyword(n)]
    return next((n for n in called if not hasattr(builtins, n)), called[0] if called else None)


def _compiles(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec")
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False


def extract_code(completion: str, function: str | None = None) -> str:
    """The Python code of a completion: up to ``[DONE]``, without ``[BEGIN]``; when a Markdown
    fence shows up, the code before a closing fence (a reply that began inside an opened
    block) or else the fenced block itself."""
    text = cut_at_stops(completion, ("[DONE]",)).replace("[BEGIN]", "")
    fence = _FENCE_LINE.search(text)
    if fence is None:
        return text
    before = text[: fence.start()]
    if before.strip() and _compiles(before):
        return before
    code = fenced_code(text, prefer=function)
    return code if code is not None else before


class MBPP(BaseBenchmark):
    name = "mbpp"
    default_source = f"the Hugging Face Hub dataset {HUB_REPO} (full config: test split, prompt split for the shots)"
    primary_metric = "pass@1"
    runs_code = True
    max_new_tokens = 512
    stop = ("[DONE]", "\n```")
    option_defaults = {"shots": 3, "chat": None, "timeout_s": 10.0}

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "shots":
            return as_int(self.name, key, value, 0, len(SHOT_IDS))
        if key == "timeout_s":
            return as_float(self.name, key, value, 0)
        return super()._check_option(key, value)

    def load(self, source: str | Path | None = None) -> list[Item]:
        shots = self.options["shots"]
        if source is None:
            path, records = self._tasks(sources.hub_file(self.name, HUB_REPO, HUB_FILES["test"]))
            shot_path, shot_records = (self._tasks(sources.hub_file(self.name, HUB_REPO, HUB_FILES["prompt"]))
                                       if shots else (path, records))
        else:
            path, records = shot_path, shot_records = self._tasks(source)
        tests = [r for r in records if r[0] in TEST_IDS]
        if not tests:
            raise RepskipError(
                f"{self.name}: {path} holds no task of the test split (task_id 11-510); pass the full mbpp.jsonl"
            )
        by_id = {tid: record for tid, record in shot_records}
        wanted = SHOT_IDS[:shots]
        missing = [tid for tid in wanted if tid not in by_id]
        if missing:
            raise RepskipError(
                f"{self.name}: {shot_path} lacks task_id {missing[0]}, one of the {shots}-shot examples "
                f"({', '.join(map(str, wanted))}); pass the full mbpp.jsonl or shots=0"
            )
        prefix = ""
        for tid in wanted:
            text, code, test_list, _ = self._fields(shot_path, by_id[tid])
            prefix += f"{task_text(text, test_list)}[BEGIN]\n{code}\n[DONE]\n"
        items = []
        for tid, record in tests:
            text, code, test_list, setup = self._fields(path, record)
            items.append(Item(
                id=f"mbpp/{tid}",
                prompt=f"{prefix}{task_text(text, test_list)}[BEGIN]\n",
                reference=code,
                meta={"text": text, "test_list": test_list, "test_setup_code": setup,
                      "function": tested_function(test_list)},
            ))
        return items

    def _tasks(self, source: str | Path) -> tuple[Path, list[tuple[int, sources.Record]]]:
        path, records = sources.read_records(self.name, source)
        tasks, seen = [], set()
        for record in records:
            tid = sources.field(self.name, path, record, "task_id", int)
            if tid in seen:
                raise RepskipError(f"{self.name}: {path} {record.where}: task_id {tid} appears twice")
            seen.add(tid)
            tasks.append((tid, record))
        return path, tasks

    def _fields(self, path: Path, record: sources.Record) -> tuple[str, str, list[str], str]:
        text = sources.field(self.name, path, record, "text").strip()
        code = sources.field(self.name, path, record, "code").replace("\r\n", "\n").strip()
        test_list = [t.strip() for t in sources.string_list(self.name, path, record, "test_list")]
        if not test_list:
            raise RepskipError(f"{self.name}: {path} {record.where}: test_list is empty")
        setup = record.data.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise RepskipError(f"{self.name}: {path} {record.where}: field 'test_setup_code' must be a string")
        return text, code, test_list, setup.replace("\r\n", "\n")

    def prompt(self, item: Item, tokenizer: Any, chat: bool) -> str:
        templated, instruct = self._instruct(chat, tokenizer)
        if not instruct:
            return self._template(tokenizer, item.prompt, templated)
        text = task_text(item.meta["text"], item.meta["test_list"]) + "\nWrite the code in a ```python block."
        if templated:
            return self._template(tokenizer, text, True, prefill="```python\n")
        return f"{text}\n\n```python\n"

    def score(self, item: Item, completion: str) -> dict[str, float]:
        try:
            code = extract_code(completion or "", item.meta.get("function"))
        except Exception:  # nothing to run
            return {"pass@1": 0.0}
        tests = "\n".join(item.meta["test_list"])
        program = f"{code}\n\n\n{item.meta['test_setup_code']}\n\n{tests}\n"
        return {"pass@1": float(passes(program, self.options["timeout_s"]))}
