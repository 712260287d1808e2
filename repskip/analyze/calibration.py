"""Calibration text: where it comes from, how it is tokenised and batched."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .. import corpora
from ..errors import RepskipError
from ..textio import iter_paragraphs, tokenize_prefix

BUILTIN = "builtin"
TEXT_FIELDS = ("text", "question", "prompt", "problem", "content")
MIN_CHARS = 20  # shorter paragraphs (headings, stray lines) carry little signal
# Each text is cut to a number of characters before it is tokenised. This only bounds memory
# (a calibration file may be one 60 MB line); tokenize_prefix makes the exact cut in tokens.
MAX_CHARS = 1_000_000  # when the number of tokens wanted is not known
CHARS_PER_TOKEN = 64  # generous: English averages about 4 characters a token, code about 3


def char_cap(max_length: int) -> int:
    """Characters kept of each text when at most ``max_length`` tokens are wanted from it."""
    return max(65536, CHARS_PER_TOKEN * max_length)


@dataclass(frozen=True)
class CalibrationSet:
    """Token sequences ready for the model, and what they were made from."""

    source: str
    sequences: list[list[int]]
    max_length: int

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.sequences).encode())
        return "sha256:" + digest.hexdigest()[:32]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "hash": self.hash,
            "sequences": len(self.sequences),
            "tokens": self.tokens,
            "max_length": self.max_length,
        }


def builtin_texts() -> list[str]:
    text = resources.files("repskip").joinpath("data/calibration.txt").read_text("utf-8")
    return _paragraphs(text)


def _paragraphs(text: str) -> list[str]:
    # a "blank" line may hold spaces (WikiText's do)
    blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    return [b for b in blocks if len(b) >= MIN_CHARS]


def _jsonl_texts(path: Path, field: str | None, max_chars: int = MAX_CHARS) -> list[str]:
    """The text of each record, blank ones left out, each cut to ``max_chars`` characters.

    The file is read a line at a time: one record is held whole, never the whole file."""
    with open(path, encoding="utf-8", newline=None) as f:
        return [t[:max_chars] for t in _jsonl_records(path, f, field) if t.strip()]


def _jsonl_records(path: Path, lines, field: str | None, option: str = "--calib-field") -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RepskipError(f"{path}:{lineno} is not valid JSON; fix the line") from None
        if isinstance(record, str):
            yield record
            continue
        if not isinstance(record, dict):
            raise RepskipError(f"{path}:{lineno} is neither a string nor an object")
        key = field or next((k for k in TEXT_FIELDS if k in record), None)
        if key is None or key not in record:
            wanted = field or " / ".join(TEXT_FIELDS)
            raise RepskipError(
                f"{path}:{lineno} has no {wanted!r} field; name the field with {option}"
            )
        yield str(record[key])


def load_texts(
    source: str | Path | None = None, field: str | None = None, *, max_chars: int = MAX_CHARS
) -> tuple[list[str], str]:
    """Texts from the built-in set, a named corpus (repskip.corpora), a .txt file (blank-line
    paragraphs) or a .jsonl file, each cut to its first ``max_chars`` characters (files are read in bounded pieces)."""
    if source is None or str(source) == BUILTIN:
        return [t[:max_chars] for t in builtin_texts()], BUILTIN
    if corpora.is_named(source):  # the Python standard library's source, say
        return [t[:max_chars] for t in corpora.texts(str(source)) if len(t) >= MIN_CHARS], str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        raise RepskipError(f"calibration source {path} is a folder; pass a .txt or .jsonl file")
    if not path.is_file():
        raise RepskipError(f"calibration file {path} does not exist")
    max_chars = max(max_chars, MIN_CHARS)
    try:
        if path.suffix == ".jsonl":
            texts = _jsonl_texts(path, field, max_chars)  # blank texts left out before the cut
        else:
            texts = list(iter_paragraphs(path, max_chars=max_chars, min_chars=MIN_CHARS))
    except UnicodeDecodeError:
        raise RepskipError(f"calibration file {path} is not UTF-8 text") from None
    if not texts:
        raise RepskipError(f"calibration file {path} holds no text")
    return texts, str(path)


def pick_texts(
    source: str | Path | None = None,
    *,
    field: str | None = None,
    num_samples: int = 64,
    seed: int = 0,
    max_chars: int = MAX_CHARS,
) -> tuple[list[str], str]:
    """Up to ``num_samples`` texts: all of them, or a seeded sample when there are more.
    Each is cut to ``max_chars`` characters, which changes neither their number nor the sample."""
    texts, label = load_texts(source, field, max_chars=max_chars)
    if len(texts) > num_samples:
        texts = random.Random(seed).sample(texts, num_samples)
    return texts, label


def build(
    tokenizer,
    source: str | Path | None = None,
    *,
    field: str | None = None,
    num_samples: int = 64,
    max_length: int = 256,
    seed: int = 0,
) -> CalibrationSet:
    """Pick ``num_samples`` texts (a seeded sample when there are more) and tokenise them."""
    if num_samples < 1 or max_length < 2:
        raise RepskipError("calibration needs at least 1 sample of at least 2 tokens")
    texts, label = pick_texts(
        source, field=field, num_samples=num_samples, seed=seed, max_chars=char_cap(max_length)
    )
    sequences = []
    for text in texts:  # as tokenizer(text, truncation=True, max_length=...), on a bounded prefix
        ids = tokenize_prefix(tokenizer, text, max_length)
        if len(ids) >= 2:
            sequences.append(ids)
    if not sequences:
        raise RepskipError(f"calibration source {label} gave no sequence of 2 or more tokens")
    return CalibrationSet(label, sequences, max_length)


def batches(
    sequences: list[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask), longest first to waste little padding.

    Right padding keeps every real token at its true position; the causal mask keeps real
    tokens from seeing the padding after them, and the attention mask does the rest.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield pad_right([sequences[i] for i in order[start : start + batch_size]], pad_id)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded batch: (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask
