"""Perplexity on a text file: next-token for autoregressive models, the masked-token
estimate for diffusion models (computed by repskip.perplexity; this plugin only cuts the
text into items)."""

from __future__ import annotations

import re
from pathlib import Path

from repskip.benchmark import Benchmark, Item
from repskip.errors import RepskipError


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
        if not path.is_file():
            raise RepskipError(f"perplexity text file {path} does not exist")
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError:
            raise RepskipError(f"perplexity text file {path} is not UTF-8 text") from None
        paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]  # blank lines may hold spaces
        items, chunk = [], ""
        for para in paragraphs:  # whole paragraphs, about chunk_chars characters per item
            chunk = f"{chunk}\n\n{para}" if chunk else para
            if len(chunk) >= self.chunk_chars:
                items.append(Item(f"ppl/{path.stem}/{len(items)}", chunk, None))
                chunk = ""
        if chunk:
            items.append(Item(f"ppl/{path.stem}/{len(items)}", chunk, None))
        if not items:
            raise RepskipError(f"perplexity text file {path} holds no text")
        return items
