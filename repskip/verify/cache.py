"""verify's per-item cache: one JSON line per finished item, so an interrupted run resumes
where it stopped and never recomputes an item."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..errors import RepskipError
from ..outputs import write_atomic


class ItemCache:
    """One JSON line per finished item; a batch is appended in one write and fsynced.

    Under several processes each rank appends to its own file (``stem.rankN.jsonl``) and
    reads them all, so an item finished by any rank, in any earlier run, counts as done.
    A line cut short by a killed run is skipped (its item is recomputed once) and the file
    is rewritten without it; a file that is not a cache at all is a one-line error.
    """

    def __init__(self, folder: Path, stem: str, rank: int = 0, world: int = 1):
        self.path = folder / (f"{stem}.jsonl" if world == 1 else f"{stem}.rank{rank}.jsonl")
        self.folder, self.stem = folder, stem
        self.records: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        files = sorted(self.folder.glob(f"{self.stem}.jsonl")) + sorted(self.folder.glob(f"{self.stem}.rank*.jsonl"))
        for path in files:
            kept, torn = self._read(path)
            for line, record in kept:
                self.records.setdefault(record["id"], record)
            if torn and path == self.path:  # only the owner rewrites: other ranks may be appending
                warnings.warn(f"{path}: skipped {torn} record(s) cut short by an interrupted run; "
                              "those items are computed again", stacklevel=2)
                write_atomic(path, "".join(line + "\n" for line, _ in kept))

    @staticmethod
    def _read(path: Path) -> tuple[list[tuple[str, dict]], int]:
        """(valid lines with their records, number of torn lines)."""
        fix = "delete it or choose another --output"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RepskipError(f"cannot read the verify cache {path} ({exc.strerror}); {fix}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if b"\0" in raw or (raw and not text):
            raise RepskipError(f"{path} is not a repskip verify cache (binary data); {fix}")
        kept, torn = [], 0
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a write cut short, or two such merged: redone
                torn += 1
                continue
            problem = _record_problem(record)
            if problem:
                raise RepskipError(f"{path} line {lineno} is not a verify record ({problem}); {fix}")
            kept.append((line, record))
        return kept, torn

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def add(self, records: list[dict]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in records))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise RepskipError(f"writing the verify cache {self.path} failed ({exc.strerror or exc}); items "
                               "finished so far are kept: free space and run the same command again") from None
        self.records.update({r["id"]: r for r in records})


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("id"), str):
        return "no string 'id'"
    metrics = record.get("metrics")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        return "'metrics' is not a mapping of numbers"
    return None
