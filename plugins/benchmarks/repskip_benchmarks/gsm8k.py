"""GSM8K (Cobbe et al. 2021): grade-school math word problems with a numeric answer.

Prompt (the lm-eval ``gsm8k`` layout, few-shot, ``Question: ...\\nAnswer: ...`` blocks split by
a blank line): the few-shot examples are the FIRST ``shots`` problems of the train split, in
file order, with their reference solutions (calculator annotations ``<<48/2=24>>`` removed,
ending in ``#### N``). Fixed first-N rather than a seeded sample, so the prompt is the same
for every run and every machine. With a local ``test.jsonl`` the train split is the file
named ``train.jsonl`` beside it (any ``test`` in the name replaced by ``train``); with the
default source it is openai/gsm8k's train split.

Instruction (chat) prompt: zero-shot chain of thought, asked to end with "The final answer is
N" (the marker of lm-eval's chat variant, gsm8k_cot_llama), with up to 1024 new tokens: chat
models reason at length, and 256 tokens cut a third of a 0.5B chat model's answers short.

Scores: ``strict`` reads the number after ``#### ``, "The (final) answer is" or inside
``\\boxed{}`` (what math-tuned chat models write whatever they are asked); ``flexible`` (the
primary metric) reads the last number in the text. Both are cut at the stop strings first and
compare numerically: "1,000.00" == 1000, "$18" == 18, "-3" is negative, "18 dollars." == 18.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from repskip.benchmark import Item
from repskip.errors import RepskipError

from . import sources
from .common import BaseBenchmark, as_int

HUB_REPO = "openai/gsm8k"
HUB_FILES = {"test": "main/test-00000-of-00001.parquet", "train": "main/train-00000-of-00001.parquet"}

INSTRUCTION = (
    "Solve the following math word problem. Reason step by step, then finish with a line of "
    'the form "The final answer is N" where N is the final number.'
)
# New tokens for the chain of thought of the instruction prompt (the few-shot one: max_new_tokens).
CHAT_MAX_NEW_TOKENS = 1024

# A number as written in prose: a sign only when attached ("-3", "-$3", "$-3"; not the minus of
# "5-3"), an optional $, thousands separators only in groups of three ("1,2,3" is three
# numbers), optional decimals. Not inside a word or after a decimal point.
_VALUE = r"(?P<sign>-)?\$?(?P<sign2>-)?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
NUMBER = re.compile(r"(?<![\w.])" + _VALUE)
STRICT = re.compile(r"(?:(?:####|\bthe\s+(?:final\s+)?answer\s+is)\s*:?\s*\**\s*(?:\$*\\boxed\{\s*)?"
                    r"|\\boxed\{\s*)" + _VALUE, re.I)
_CALC = re.compile(r"<<[^<>]*>>")


def to_decimal(match: re.Match) -> Decimal:
    value = Decimal(match.group("num").replace(",", ""))
    return -value if match.group("sign") or match.group("sign2") else value


def reference_answer(answer: str) -> Decimal | None:
    """The number after the last ``####`` of a GSM8K solution."""
    if "####" not in answer:
        return None
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    try:
        return Decimal(tail)
    except InvalidOperation:
        return None


def canonical(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


class GSM8K(BaseBenchmark):
    name = "gsm8k"
    default_source = f"the Hugging Face Hub dataset {HUB_REPO} (test split; few-shot from its train split)"
    primary_metric = "flexible"
    max_new_tokens = 256
    stop = ("Question:", "\n\n\n")
    option_defaults = {"shots": 8, "chat": None}

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "shots":
            return as_int(self.name, key, value, 0)
        return super()._check_option(key, value)

    # --- loading ------------------------------------------------------------------------------

    def load(self, source: str | Path | None = None) -> list[Item]:
        shots = self.options["shots"]
        if source is None:
            test = sources.hub_file(self.name, HUB_REPO, HUB_FILES["test"])
            train = sources.hub_file(self.name, HUB_REPO, HUB_FILES["train"]) if shots else None
        else:
            test = Path(source).expanduser()
            train = self._train_beside(test) if shots else None
        path, records = sources.read_records(self.name, test)
        rows = [self._row(path, r) for r in records]
        prefix = self._fewshot_prefix(train, shots) if shots else ""
        items = []
        for record, (question, answer, ref) in zip(records, rows):
            items.append(Item(
                id=f"gsm8k/test/{record.index}",
                prompt=f"{prefix}Question: {question}\nAnswer:",
                reference=canonical(ref),
                meta={"question": question, "answer": answer},
            ))
        return items

    def _row(self, path: Path, record: sources.Record) -> tuple[str, str, Decimal]:
        question = sources.field(self.name, path, record, "question").strip()
        answer = sources.field(self.name, path, record, "answer")
        ref = reference_answer(answer)
        if ref is None:
            raise RepskipError(
                f"{self.name}: {path} {record.where}: field 'answer' does not end in '#### N'; "
                "pass a GSM8K file (question, answer)"
            )
        return question, answer, ref

    def _train_beside(self, test: Path) -> Path:
        candidates = []
        if "test" in test.name:
            candidates.append(test.with_name(test.name.replace("test", "train", 1)))
        candidates.append(test.with_name("train.jsonl"))
        for candidate in candidates:
            if candidate.is_file() and candidate.resolve() != test.resolve():
                return candidate
        raise RepskipError(
            f"{self.name}: {self.options['shots']}-shot prompts take their examples from the train "
            f"split, expected at {candidates[0]}; put train.jsonl beside the test file or pass shots=0"
        )

    def _fewshot_prefix(self, train: Path | None, shots: int) -> str:
        path, records = sources.read_records(self.name, train)
        if len(records) < shots:
            raise RepskipError(f"{self.name}: {path} has {len(records)} problems, fewer than shots={shots}")
        blocks = []
        for record in records[:shots]:
            question, answer, _ = self._row(path, record)
            solution = _CALC.sub("", answer).strip()
            blocks.append(f"Question: {question}\nAnswer: {solution}\n\n")
        return "".join(blocks)

    # --- prompting ----------------------------------------------------------------------------

    def generation_budget(self, tokenizer: Any, chat: bool) -> int:
        return CHAT_MAX_NEW_TOKENS if self._instruct(chat, tokenizer)[1] else self.max_new_tokens

    def prompt_variant(self, tokenizer: Any, chat: bool) -> str:
        templated, instruct = self._instruct(chat, tokenizer)
        if instruct:
            return ("zero-shot chain of thought, 'The final answer is N' or \\boxed{N} (lm-eval gsm8k_cot_llama's "
                    "marker)" + (", chat template" if templated else ", plain text"))
        shots = self.options["shots"]
        return f"{shots}-shot 'Question/Answer' completion (lm-eval gsm8k)" if shots else "zero-shot completion"

    def prompt(self, item: Item, tokenizer: Any, chat: bool) -> str:
        templated, instruct = self._instruct(chat, tokenizer)
        if not instruct:
            return self._template(tokenizer, item.prompt, templated)
        text = f"{INSTRUCTION}\n\nQuestion: {item.meta['question']}"
        if templated:
            return self._template(tokenizer, text, True)
        return f"{text}\nAnswer:"

    # --- scoring ------------------------------------------------------------------------------

    def score(self, item: Item, completion: str) -> dict[str, float]:
        try:
            reference = Decimal(item.reference)
            text = self._cut(completion or "")
            numbers = list(NUMBER.finditer(text))
            marked = list(STRICT.finditer(text))
            flexible = bool(numbers) and to_decimal(numbers[-1]) == reference
            strict = bool(marked) and to_decimal(marked[-1]) == reference
        except (InvalidOperation, ValueError, TypeError):
            flexible = strict = False
        return {"flexible": float(flexible), "strict": float(strict)}
