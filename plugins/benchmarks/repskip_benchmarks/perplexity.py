"""Perplexity on a text file: next-token for autoregressive models, the masked-token
estimate for diffusion models (computed by repskip.verify.likelihood; this plugin only cuts the
text into items)."""

from __future__ import annotations

from pathlib import Path

from repskip.benchmark import Benchmark, Item
from repskip.errors import RepskipError
from repskip.textio import iter_paragraphs

# The text file is read in bounded pieces, and a paragraph is cut at this many characters, so
# that a file of one 60 MB line costs no more than a short one. It is far past what an item
# can use: verify scores each item's first max_length tokens (1024 by default), and a million
# characters are about 250,000 tokens of English.
PARAGRAPH_CHARS = 1_000_000


class Perplexity(Benchmark):
    default_source = "a plain-text file (e.g. WikiText-2 test.txt)"
    kind = "perplexity"
    primary_metric = "perplexity"
    higher_is_better = False

    def __init__(self, chunk_chars: int = 2000, **options):
        unknown = sorted(options)
        if unknown:
            raise RepskipError(f"perplexity has no option {unknown[0]!r}; it takes: chunk_chars")
        super().__init__(chunk_chars=chunk_chars)
        self.chunk_chars = int(chunk_chars)

    def load(self, source: str | Path | None = None) -> list[Item]:
        if source is None:
            raise RepskipError(f"perplexity needs a text file: pass --data perplexity=PATH ({self.default_source})")
        path = Path(source)
        if path.is_dir():
            raise RepskipError(f"perplexity text source {path} is a folder; pass a text file")
        if not path.is_file():
            raise RepskipError(f"perplexity text file {path} does not exist")
        items, chunk = [], ""
        try:  # paragraphs split at blank lines (which may hold spaces), each cut at PARAGRAPH_CHARS
            for para in iter_paragraphs(path, max_chars=PARAGRAPH_CHARS):
                chunk = f"{chunk}\n\n{para}" if chunk else para  # whole paragraphs, about chunk_chars per item
                if len(chunk) >= self.chunk_chars:
                    items.append(Item(f"ppl/{path.stem}/{len(items)}", chunk, None))
                    chunk = ""
        except UnicodeDecodeError:
            raise RepskipError(f"perplexity text file {path} is not UTF-8 text") from None
        if chunk:
            items.append(Item(f"ppl/{path.stem}/{len(items)}", chunk, None))
        if not items:
            raise RepskipError(f"perplexity text file {path} holds no text")
        return items
