"""Training text for healing: read, tokenised, packed into sequences, a held-out slice set
aside.

Sources: a text file, a folder of text files (``*.txt``, ``*.md``, ``*.jsonl``, read in name
order), a JSON-lines file (a text field per record), a named corpus every machine has
(``python-stdlib``: repskip.corpora), or a Hugging Face Hub dataset named
``hub:NAME[:CONFIG]`` (its train split; needs the ``datasets`` package and a connection).
Each file or record is one document; documents are joined with the end-of-text token and
cut into sequences of ``seq_len`` tokens, the remainder dropped. The last
``eval_sequences`` sequences are held out for the evaluation loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import corpora
from ..errors import RepskipError

MAX_BYTES = 1 << 30  # a training source larger than this is refused: it is all held in memory
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
CHUNK_CHARS = 1 << 20  # a long document is tokenised in pieces of about this size, cut at blank lines


@dataclass
class TrainData:
    train: torch.Tensor  # [N, seq_len] token ids
    held_out: torch.Tensor  # [M, seq_len]
    source: str
    documents: int
    text_sha256: str  # of the documents' text
    tokens_sha256: str  # of the packed token ids, train then held out

    def record(self) -> dict:
        return {"source": self.source, "documents": self.documents, "seq_len": int(self.train.shape[1]),
                "train_sequences": int(self.train.shape[0]), "held_out_sequences": int(self.held_out.shape[0]),
                "text_sha256": self.text_sha256, "tokens_sha256": self.tokens_sha256}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise RepskipError(f"data folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
    return files


def read_documents(source: str, text_field: str | None = None) -> tuple[list[str], str]:
    """The documents of ``source`` and how to name it in the record."""
    if source.startswith("hub:"):
        return _hub_documents(source[4:], text_field), source
    if corpora.is_named(source):  # the Python standard library's source, say: no download
        return corpora.documents(source), corpora.label(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise RepskipError(f"training data {source} does not exist; give a text file, a folder, a .jsonl file "
                           "or hub:DATASET")
    files = _files(path)
    size = sum(f.stat().st_size for f in files)
    if size > MAX_BYTES:
        raise RepskipError(f"training data {source} is {size / 2**30:.1f} GiB; healing holds its text in memory "
                           f"and takes at most {MAX_BYTES / 2**30:.0f} GiB: pass a smaller slice")
    from ..analyze.calibration import _jsonl_records

    docs: list[str] = []
    for file in files:
        try:
            if file.suffix == ".jsonl":
                with open(file, encoding="utf-8") as f:
                    docs.extend(t for t in _jsonl_records(file, f, text_field, "--text-field") if t.strip())
            else:
                text = file.read_text("utf-8")
                if text.strip():
                    docs.append(text)
        except UnicodeDecodeError:
            raise RepskipError(f"training data {file} is not UTF-8 text") from None
    if not docs:
        raise RepskipError(f"training data {source} holds no text")
    return docs, str(path)


def _hub_documents(spec: str, text_field: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise RepskipError("hub: data needs the datasets package: pip install datasets") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # offline, unknown name, ...: one line
        raise RepskipError(f"could not load Hub dataset {spec}: {str(exc).splitlines()[0]}") from None
    field = text_field or "text"
    if field not in ds.column_names:
        raise RepskipError(f"Hub dataset {spec} has no {field!r} column ({', '.join(ds.column_names)}); "
                           "name it with --text-field")
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


def _pieces(text: str) -> list[str]:
    """``text`` in pieces of about CHUNK_CHARS, cut after a blank line where one is near."""
    out, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        cut = text.rfind("\n\n", start, start + CHUNK_CHARS)
        cut = cut + 2 if cut > start else start + CHUNK_CHARS
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def pack(tokenizer: Any, docs: list[str], source: str, seq_len: int, eval_sequences: int) -> TrainData:
    if seq_len < 2:
        raise RepskipError(f"--seq-len must be at least 2, got {seq_len}")
    if eval_sequences < 0:
        raise RepskipError(f"--eval-sequences cannot be negative, got {eval_sequences}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    text_hash = hashlib.sha256()
    for i, doc in enumerate(docs):
        text_hash.update(doc.encode("utf-8") + b"\0")
        if i and eos is not None:
            stream.append(int(eos))
        for piece in _pieces(doc):
            stream.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    count = len(stream) // seq_len
    if count < eval_sequences + 1:
        raise RepskipError(
            f"training data {source} gives {len(stream):,} tokens: {count} full sequence(s) of {seq_len}, and "
            f"healing needs at least {eval_sequences + 1} ({eval_sequences} held out); give more text or lower "
            "--seq-len or --eval-sequences"
        )
    ids = torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
    tokens_sha = hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest()
    split = count - eval_sequences
    return TrainData(ids[:split], ids[split:], source, len(docs), "sha256:" + text_hash.hexdigest(),
                     "sha256:" + tokens_sha)
