"""MATH-500: the 500-problem subset of the MATH test set chosen for PRM800K (Lightman et al.).

Prompt: an instruction to reason and put the final answer in \\boxed{}, then
``Problem: ...\\n\\nSolution:``. ``shots`` (default 0, at most 4) prepends the Minerva 4-shot
examples (Lewkowycz et al. 2022) as math-verify ships them (``MATH_HARD_FEW_SHOTS``), with their
"The final answer is ... I hope it is correct." line dropped so each ends in its \\boxed{}.
The test problems are never used as examples.

Score: ``accuracy`` is math-verify's ``verify`` of the LAST \\boxed{...} (or \\fbox) of the
completion, braces matched, against the reference answer; \\boxed{\\frac{1}{2}} equals 0.5,
\\dfrac and \\tfrac are fractions, sets and tuples compare as such. No \\boxed{} scores 0.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from repskip.benchmark import Item
from repskip.errors import RepskipError

from . import sources
from .common import BaseBenchmark, as_int

HUB_REPO = "HuggingFaceH4/MATH-500"
HUB_FILE = "test.jsonl"

INSTRUCTION = (
    "Solve the following math problem. Reason step by step, and put the final answer "
    "in \\boxed{}."
)
_FINAL_LINE = re.compile(r"\n\s*The final answer is .*$", re.S)
_TIMEOUT_S = 5  # math-verify's own limit per parse and per comparison (SIGALRM, main thread)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} in ``text`` (nested braces matched;
    also the brace-less ``\\boxed 5``), or None when there is none or it is unclosed."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts):
        rest = text[m.end():]
        bare = re.match(r" +([^\s$]+)", rest)
        if not rest.lstrip(" ").startswith("{"):
            if bare:
                return bare.group(1)
            continue
        open_at = m.end() + rest.index("{")
        depth = 0
        for i in range(open_at, len(text)):
            ch = text[i]
            if ch == "\\":  # an escaped brace \{ or \} does not count
                continue
            if ch == "{" and text[i - 1] != "\\":
                depth += 1
            elif ch == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[open_at + 1:i]
        # unclosed: try an earlier one
    return None


def _math_verify():
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError:  # a dependency of this package; only a broken install gets here
        raise RepskipError("math500: math-verify is not installed: pip install math-verify") from None
    return LatexExtractionConfig, parse, verify


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_boxed(content: str) -> list:
    """math-verify's parse of ``\\boxed{content}``: [sympy object, string] or [] when unparseable."""
    LatexExtractionConfig, parse, _ = _math_verify()
    return parse(f"\\boxed{{{content}}}", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=_timeout())


def equivalent(reference: str, answer: str) -> bool:
    """Whether the LaTeX ``answer`` is mathematically the reference (math-verify)."""
    _, _, verify = _math_verify()
    gold, pred = parse_boxed(reference), parse_boxed(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_timeout()))


def minerva_shots() -> list[tuple[str, str]]:
    """The Minerva MATH 4-shot examples shipped by math-verify: (problem, solution) pairs."""
    try:
        from math_verify.few_shots import MATH_HARD_FEW_SHOTS
    except ImportError:
        raise RepskipError(
            "math500: this math-verify has no few-shot examples (math_verify.few_shots); pass shots=0"
        ) from None
    return [(s["question"].strip(), _FINAL_LINE.sub("", s["answer"]).strip()) for s in MATH_HARD_FEW_SHOTS]


class MATH500(BaseBenchmark):
    name = "math500"
    default_source = f"the Hugging Face Hub dataset {HUB_REPO} ({HUB_FILE})"
    primary_metric = "accuracy"
    max_new_tokens = 512
    stop = ("Problem:",)
    option_defaults = {"shots": 0, "chat": None}

    def _check_option(self, key: str, value: Any) -> Any:
        if key == "shots":
            return as_int(self.name, key, value, 0, 4)
        return super()._check_option(key, value)

    def load(self, source: str | Path | None = None) -> list[Item]:
        if source is None:
            source = sources.hub_file(self.name, HUB_REPO, HUB_FILE)
        path, records = sources.read_records(self.name, source)
        shots = minerva_shots()[: self.options["shots"]]
        prefix = "".join(f"Problem: {q}\n\nSolution: {a}\n\n" for q, a in shots)
        items, seen = [], set()
        for record in records:
            problem = sources.field(self.name, path, record, "problem").strip()
            answer = sources.field(self.name, path, record, "answer").strip()
            uid = sources.field(self.name, path, record, "unique_id")
            if uid in seen:
                raise RepskipError(f"{self.name}: {path} {record.where}: unique_id {uid!r} appears twice")
            seen.add(uid)
            meta = {"problem": problem}
            for key in ("subject", "level"):
                if key in record.data:
                    meta[key] = record.data[key]
            items.append(Item(uid, f"{INSTRUCTION}\n\n{prefix}Problem: {problem}\n\nSolution:", answer, meta))
        return items

    def prompt(self, item: Item, tokenizer: Any, chat: bool) -> str:
        templated, instruct = self._instruct(chat, tokenizer)
        if not instruct:
            return self._template(tokenizer, item.prompt, templated)
        text = f"{INSTRUCTION}\n\nProblem: {item.meta['problem']}"
        return self._template(tokenizer, text, True) if templated else f"{text}\n\nSolution:"

    def score(self, item: Item, completion: str) -> dict[str, float]:
        try:
            boxed = last_boxed(self._cut(completion or ""))
            right = boxed is not None and bool(boxed.strip()) and equivalent(str(item.reference), boxed)
        except RepskipError:
            raise
        except Exception:  # sympy and the LaTeX parser can fail in many ways on model output
            right = False
        return {"accuracy": float(right)}
