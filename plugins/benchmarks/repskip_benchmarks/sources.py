"""Reading benchmark data: local JSONL (plain or gzip) and Parquet files, and the Hugging Face Hub.

Every problem a user can fix is a one-line RepskipError that names the benchmark, the file and,
for a bad record, its line (or Parquet row), and says what to pass instead.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from repskip.errors import RepskipError

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Record:
    """One row of a data file: its 0-based position among the rows and where it is in the file."""

    index: int
    where: str  # "line 12" (JSONL, 1-based) or "row 12" (Parquet, 1-based)
    data: dict


def data_hint(bench: str) -> str:
    return f"--data {bench}=PATH"


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def read_records(bench: str, source: str | os.PathLike) -> tuple[Path, list[Record]]:
    """All records of a local JSONL (.jsonl or gzip-compressed) or Parquet file.

    The format is told by the file's first bytes, not its name. Blank lines are skipped; a
    line that is not a JSON object, or a file with no record, is an error naming the file.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise RepskipError(f"{bench}: data file {path} does not exist; pass an existing file ({data_hint(bench)})")
    if not path.is_file():
        raise RepskipError(f"{bench}: {path} is not a file; pass the data file itself ({data_hint(bench)})")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise RepskipError(f"{bench}: cannot read {path} ({_first_line(exc)})") from None
    if head == _PARQUET_MAGIC:
        records = _read_parquet(bench, path)
    else:
        records = _read_jsonl(bench, path, gzipped=head[:2] == _GZIP_MAGIC)
    if not records:
        raise RepskipError(f"{bench}: {path} holds no records; pass a non-empty data file ({data_hint(bench)})")
    return path, records


def _read_jsonl(bench: str, path: Path, gzipped: bool) -> list[Record]:
    records: list[Record] = []
    lineno = 0
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise RepskipError(f"{bench}: {path} line {lineno} is not UTF-8 text; pass a JSONL file") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RepskipError(
                        f"{bench}: {path} line {lineno} is not valid JSON ({exc.msg}, column {exc.colno}); "
                        f"fix the line or pass another file ({data_hint(bench)})"
                    ) from None
                if not isinstance(row, dict):
                    raise RepskipError(
                        f"{bench}: {path} line {lineno} is a JSON {type(row).__name__}, not an object; "
                        "each line must hold one record"
                    )
                records.append(Record(len(records), f"line {lineno}", row))
    except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream
        raise RepskipError(
            f"{bench}: {path} is damaged near line {lineno + 1} ({_first_line(exc)}); pass an intact file"
        ) from None
    return records


def _read_parquet(bench: str, path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RepskipError(
            f"{bench}: {path} is Parquet, which needs pyarrow: pip install 'repskip-benchmarks[hub]', "
            "or pass a JSONL file"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RepskipError(f"{bench}: {path} is not a readable Parquet file ({_first_line(exc)})") from None
    return [Record(i, f"row {i + 1}", row) for i, row in enumerate(rows)]


def field(bench: str, path: Path, record: Record, name: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record.data[name]``, checked to be present and of ``kind``."""
    if name not in record.data:
        present = ", ".join(sorted(record.data)) or "none"
        raise RepskipError(
            f"{bench}: {path} {record.where} has no field {name!r} (its fields: {present}); "
            f"pass a {bench} data file ({data_hint(bench)})"
        )
    value = record.data[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        wanted = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RepskipError(
            f"{bench}: {path} {record.where}: field {name!r} holds {type(value).__name__}, expected {wanted}"
        )
    return value


def string_list(bench: str, path: Path, record: Record, name: str) -> list[str]:
    value = field(bench, path, record, name, list)
    if not all(isinstance(v, str) for v in value):
        raise RepskipError(f"{bench}: {path} {record.where}: field {name!r} must be a list of strings")
    return value


# --- the Hugging Face Hub -------------------------------------------------------------------


def _download(repo_id: str, filename: str, local_only: bool) -> str:
    """hf_hub_download of a dataset file (its own function so tests can stand in for the Hub)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=local_only)


def _offline_mode() -> bool:
    try:
        import huggingface_hub

        check = getattr(huggingface_hub, "is_offline_mode", None)
        if check is not None:
            return bool(check())
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return True


@functools.lru_cache(maxsize=None)
def _hub_reachable() -> bool:
    """A quick TCP check, so that an offline machine gets its error at once instead of after the
    Hub client's retries (~25 s). Behind a proxy the client is left to find out itself."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except ImportError:
        return False
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def hub_file(bench: str, repo_id: str, filename: str) -> Path:
    """A file of a Hub dataset repository: the cached copy when there is one, else downloaded.
    Offline with nothing cached, the error says to pass a local file."""
    hint = f"pass a local file instead ({data_hint(bench)})"
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise RepskipError(f"{bench}: huggingface_hub is not installed, so {repo_id} cannot be fetched; {hint}") from None
    try:
        return Path(_download(repo_id, filename, local_only=True))
    except Exception:
        pass  # not cached yet
    if _offline_mode() or not _hub_reachable():
        raise RepskipError(
            f"{bench}: the Hugging Face Hub is not reachable and {repo_id}/{filename} is not cached; {hint}"
        )
    try:
        return Path(_download(repo_id, filename, local_only=False))
    except Exception as exc:
        raise RepskipError(
            f"{bench}: could not fetch {filename} from the Hub dataset {repo_id} ({_first_line(exc)}); {hint}"
        ) from None
