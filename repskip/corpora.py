"""Named text corpora that every machine has, for calibration and healing without downloads.

``python-stdlib``: the Python standard library's own source, as the running interpreter ships
it (code, for code models: their calibration and healing text then matches what they write).
The test suites, IDLE and installed packages are left out, and so is any file that is not
UTF-8. For healing each file is one document; for calibration each top-level definition (a
function or class with its decorators, or the module's code in front of the first one) is
one text, so that a sample of texts is a sample of whole definitions.

The text depends on the Python version: the label names it, and the calibration hash (of the
token ids) records exactly what was read.
"""

from __future__ import annotations

import functools
import re
import sys
import sysconfig
from pathlib import Path

STDLIB = "python-stdlib"
NAMES = (STDLIB,)
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
MAX_FILE_BYTES = 1 << 20  # generated tables, not code a model learns from
_TOP = re.compile(r"^(@|def |class |async def )")


def is_named(source: object) -> bool:
    return str(source) in NAMES


def label(name: str) -> str:
    return f"{name} (Python {sys.version.split()[0]})"


def stdlib_files() -> list[Path]:
    """The standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]) and p.stat().st_size <= MAX_FILE_BYTES)


def documents(name: str) -> list[str]:
    """Each file of corpus ``name`` as one document."""
    return list(_documents(name))


@functools.lru_cache(maxsize=1)  # 11 MB read in a few seconds: once per process
def _documents(name: str) -> tuple[str, ...]:
    out = []
    for path in stdlib_files():
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append(text)
    return tuple(out)


def definitions(text: str) -> list[str]:
    """``text`` (a module's source) cut in front of each top-level definition, decorators kept
    with what they decorate."""
    blocks: list[list[str]] = [[]]
    decorated = False
    for line in text.splitlines():
        if _TOP.match(line) and not decorated:
            blocks.append([])
        decorated = line.startswith("@") or (decorated and not _TOP.match(line))
        blocks[-1].append(line)
    return [b for b in ("\n".join(block).strip("\n") for block in blocks) if b.strip()]


def texts(name: str) -> list[str]:
    """Corpus ``name`` as calibration texts: every top-level definition of every file."""
    return [block for doc in documents(name) for block in definitions(doc)]
