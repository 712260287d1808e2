"""Reading and tokenising text whose size nobody checked: a calibration or perplexity file
may be one 60 MB line, and a text may be far longer than the tokens wanted from it. Both
helpers here bound their work by what is kept, not by what the input holds. No torch
import, so that reading text stays cheap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

READ_CHARS = 65536  # characters read from a file at a time; a longer line comes in pieces
PREFIX_CHARS_PER_TOKEN = 16  # first guess of characters per wanted token; grown when short
PREFIX_MARGIN_TOKENS = 32  # tokens past the wanted ones that a prefix must give to be trusted


def split_paragraphs(
    stream: IO[str], *, max_chars: int, min_chars: int = 1, read_chars: int = READ_CHARS
) -> Iterator[str]:
    """Blank-line-separated paragraphs of a text stream, each stripped and cut to its first
    ``max_chars`` characters; those shorter than ``min_chars`` (or empty) are skipped.

    A blank line is one holding only spaces and tabs. The stream is read ``read_chars``
    characters at most at a time, and at most ``max_chars + read_chars`` characters of one
    paragraph are held, however long its lines. For paragraphs no longer than ``max_chars``
    this gives exactly ``[p.strip() for p in re.split(r"\\n[ \\t]*\\n", text)]`` (non-empty,
    at least ``min_chars`` long) on the stream's whole text.
    """
    if max_chars < 1 or read_chars < 1:
        raise ValueError("max_chars and read_chars must be positive")
    pieces: list[str] = []  # the paragraph so far, leading whitespace dropped, at most max_chars
    held = 0
    more = False  # a non-whitespace character came after the first max_chars
    line_blank = True  # the current line has held only spaces and tabs so far

    def finish() -> str | None:
        nonlocal pieces, held, more
        text = "".join(pieces)
        if not more:
            text = text.rstrip()
        pieces, held, more = [], 0, False
        return text if text and len(text) >= min_chars else None

    while True:
        piece = stream.readline(read_chars)
        if not piece:
            break
        ends = piece.endswith("\n")
        body = piece[:-1] if ends else piece
        if line_blank and not body.strip(" \t"):
            if ends:  # a whole blank line: the paragraph ends here
                done = finish()
                if done is not None:
                    yield done
                continue
        else:
            line_blank = False
        if not held:
            piece = piece.lstrip()
        room = max_chars - held
        if len(piece) <= room:
            if piece:
                pieces.append(piece)
                held += len(piece)
        else:
            if room > 0:
                pieces.append(piece[:room])
                held = max_chars
            if not more and piece[room:].strip():
                more = True
        if ends:
            line_blank = True
    done = finish()
    if done is not None:
        yield done


def iter_paragraphs(
    path: str | Path, *, max_chars: int, min_chars: int = 1, read_chars: int = READ_CHARS
) -> Iterator[str]:
    """``split_paragraphs`` of a UTF-8 text file, read with universal newlines.

    Raises UnicodeDecodeError, while iterating, on bytes that are not UTF-8."""
    with open(path, encoding="utf-8", newline=None) as f:
        yield from split_paragraphs(f, max_chars=max_chars, min_chars=min_chars, read_chars=read_chars)


def tokenize_prefix(tokenizer: Any, text: str, max_tokens: int, **tokenizer_kwargs: Any) -> list[int]:
    """``tokenizer(text, truncation=True, max_length=max_tokens, **tokenizer_kwargs)["input_ids"]``,
    at a cost bounded by ``max_tokens`` rather than by the length of ``text``.

    Only a prefix of the text is tokenised (a suffix, for a tokenizer whose
    ``truncation_side`` is ``left``): first about ``PREFIX_CHARS_PER_TOKEN`` characters per
    wanted token, doubled until it gives at least ``max_tokens + PREFIX_MARGIN_TOKENS``
    tokens or is the whole text. The tokenizer then truncates that piece itself, so special
    tokens (BOS, EOS) are added exactly as its truncation of the whole text adds them. Only the
    few tokens next to the cut can differ from the whole text's (a word or a merge split
    there), and the margin keeps them out of the result. (When ``max_tokens`` is fewer than
    the special tokens the tokenizer adds, it declines to truncate; so does this, on the whole
    text.)
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    enough = max_tokens + PREFIX_MARGIN_TOKENS
    size = PREFIX_CHARS_PER_TOKEN * enough + 256
    piece = text
    while size < len(text):
        piece = text[len(text) - size:] if left else text[:size]
        probe = tokenizer(piece, truncation=True, max_length=enough, **tokenizer_kwargs)["input_ids"]
        if len(probe) >= enough:
            break
        size *= 2
    else:
        piece = text
    ids = tokenizer(piece, truncation=True, max_length=max_tokens, **tokenizer_kwargs)["input_ids"]
    if len(ids) > max_tokens and piece is not text:
        # max_tokens is fewer than the special tokens the tokenizer adds: it then declines to
        # truncate at all, and the whole text is what it would give
        ids = tokenizer(text, truncation=True, max_length=max_tokens, **tokenizer_kwargs)["input_ids"]
    return list(ids)
