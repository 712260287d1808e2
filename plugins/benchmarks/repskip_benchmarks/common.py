"""What the four benchmarks share: checked options, chat formatting, stop strings, code blocks."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from repskip.benchmark import Benchmark
from repskip.errors import RepskipError
from repskip.sampler import format_prompt
from repskip.verify.sandbox import Limits, run_python


class BaseBenchmark(Benchmark):
    #: The entry-point name, used in every message.
    name: ClassVar[str] = ""
    #: Option -> default. ``chat`` everywhere: None = the instruction (zero-shot) prompt exactly
    #: when ``prompt`` is asked for chat and the tokenizer has a template; True/False forces it.
    option_defaults: ClassVar[dict[str, Any]] = {"chat": None}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise RepskipError(
                f"{self.name}: unknown option {unknown[0]!r}; known options: {', '.join(self.option_defaults)}"
            )
        merged = {**self.option_defaults, **options}
        for key, value in list(merged.items()):
            merged[key] = self._check_option(key, value)
        super().__init__(**merged)

    # Options may come from a command line as strings: "8", "true".
    def _check_option(self, key: str, value: Any) -> Any:
        if key == "chat":
            return as_tristate(self.name, key, value)
        return value

    def _instruct(self, chat: bool, tokenizer: Any) -> tuple[bool, bool]:
        """(use the chat template, use the instruction prompt) for a ``prompt`` call."""
        templated = bool(chat and getattr(tokenizer, "chat_template", None))
        forced = self.options.get("chat")
        return templated, templated if forced is None else forced

    def prompt_variant(self, tokenizer: Any, chat: bool) -> str:
        templated, instruct = self._instruct(chat, tokenizer)
        shots = self.options.get("shots")
        kind = "zero-shot instruction" if instruct else (f"{shots}-shot" if shots else "zero-shot") + " completion"
        return kind + (", chat template" if templated else ", plain text")

    @staticmethod
    def _template(tokenizer: Any, text: str, templated: bool, prefill: str = "") -> str:
        """``text`` as the user's message, then the assistant's turn opened with ``prefill``."""
        return format_prompt(tokenizer, text, templated) + prefill

    def _cut(self, completion: str) -> str:
        return cut_at_stops(completion, self.stop)


def as_int(bench: str, key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise RepskipError(f"{bench}: option {key} must be an integer {span}, not {value!r}")
    return value


def as_float(bench: str, key: str, value: Any, lo: float) -> float:
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not number > lo or number != number or number == float("inf"):
        raise RepskipError(f"{bench}: option {key} must be a number above {lo:g}, not {value!r}")
    return number


def as_tristate(bench: str, key: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    table = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "auto": None, "none": None}
    if text not in table:
        raise RepskipError(f"{bench}: option {key} must be true, false or auto, not {value!r}")
    return table[text]


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the first stop string (what a sampler honouring ``stop`` would return)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < cut:
            cut = at
    return text[:cut]


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n?```|\Z)", re.S)


def fenced_code(text: str, prefer: str | None = None) -> str | None:
    """The code of a Markdown ``` block in ``text`` (an unclosed one runs to the end), or None.

    Among several blocks: the first that defines ``prefer`` (a function name), else the first
    Python (or unlabelled) block, else the first block.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if not blocks:
        return None
    if prefer:
        for _, code in blocks:
            if re.search(rf"^\s*def\s+{re.escape(prefer)}\s*\(", code, re.M):
                return code
    for lang, code in blocks:
        if lang in ("", "python", "py", "python3"):
            return code
    return blocks[0][1]


def passes(program: str, timeout_s: float) -> bool:
    """Whether ``program`` exits cleanly in the sandbox (own process, limits, no network)."""
    # A completion may hold text that UTF-8 cannot encode (lone surrogates): replace it, so the
    # program fails on its own merits. A sandbox that cannot start at all is a real error.
    program = program.encode("utf-8", "replace").decode("utf-8")
    return run_python(program, Limits(timeout_s=timeout_s)).passed
