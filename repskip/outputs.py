"""Writing an output folder all at once: built in a temporary sibling, renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RepskipError


def check_free(path: Path, force: bool) -> None:
    """Refuse to overwrite ``path`` unless ``force``: the check to run before any long work."""
    if Path(path).exists() and not force:
        raise RepskipError(f"output {path} already exists; pass --force to replace it")


@contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``path`` only if the block succeeds.

    On any failure the temporary folder is removed and ``path`` is left as it was, so a
    reader never sees a half-written output.
    """
    path = Path(path)
    check_free(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():  # swap, then delete the old one: never a moment without either
            trash = path.parent / f".{path.name}.replaced-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RepskipError(f"writing {path} failed ({exc.strerror or exc}); nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
