"""Writing outputs without ever losing a user's files.

- Every folder repskip writes carries a marker file (``MARKER``); ``--force`` replaces only a
  folder with that marker (or one repskip wrote before markers existed, or an empty one), and
  never the input, anything above or inside an input, the home folder, the file system root
  or the working directory.
- Folders are built in a temporary sibling (``.NAME.partial-PID``) and renamed into place
  when complete; files are written beside and renamed. A reader never sees half an output.
- Debris of a run that was killed (SIGKILL, power loss) is removed by the next run that
  writes the same output; SIGTERM, SIGHUP and Ctrl-C in the CLI remove their own.
- A failed write (a full disk, a path under a file) is a one-line RepskipError.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import RepskipError

MARKER = ".repskip-output.json"
PARTIAL_MARKER = ".repskip-partial.json"
# Files by which an output folder written before the marker existed is recognised.
LEGACY_MARKERS = ("repskip-recipe.yaml", "repskip-onnx.json")
LEGACY_KINDS = {"analysis.json": "repskip.analysis", "report.json": "repskip.verify"}


# --- whose folder is it? --------------------------------------------------------------------
def written_by_repskip(path: Path) -> bool:
    """Whether ``path`` is a folder repskip wrote (its marker, or a pre-marker output)."""
    path = Path(path)
    if (path / MARKER).is_file() or any((path / name).is_file() for name in LEGACY_MARKERS):
        return True
    for name, kind in LEGACY_KINDS.items():
        try:
            if json.loads((path / name).read_text("utf-8")).get("kind") == kind:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _protected(target: Path, inputs: Sequence[Path]) -> str | None:
    """Why ``target`` may never be replaced or written into, or None."""
    if target == Path(target.anchor):
        return "it is the file system root"
    if target == Path.home().resolve():
        return "it is your home folder"
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if _within(target, src):
            return f"it is the input {given} or inside it" if target != src else f"it is the input {given}"
        if _within(src, target):
            return f"it holds the input {given}"
    if _within(Path.cwd().resolve(), target):
        return "it is the working directory or holds it"
    return None


def check_output(path: Path, force: bool, inputs: Sequence[Path] = (), *, file: bool = False,
                 owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse, before any long work, an output that cannot or may not be written.

    ``file``: the output is a single file (``owned`` says whether an existing one is
    repskip's, for ``--force``); otherwise a folder, replaceable only when repskip wrote it
    (its marker, or ``owned`` for a command's outputs from before the marker).
    """
    path = Path(path)
    target = path.expanduser().resolve()
    reason = _protected(target, inputs)
    if reason:
        raise RepskipError(f"refusing to write {path}: {reason}; choose another output")
    for parent in target.parents:  # a path under a file can never be created
        if parent.exists():
            if not parent.is_dir():
                raise RepskipError(f"cannot write {path}: {parent} is a file, not a folder; choose another output")
            break
    if not path.exists() and not path.is_symlink():
        return
    if file and path.is_dir():
        raise RepskipError(f"output {path} is a folder; give a file path, e.g. {path / 'recipe.yaml'}")
    if not file and not path.is_dir():
        raise RepskipError(f"output {path} is a file; give a folder path for the output")
    if not force:
        raise RepskipError(f"output {path} already exists; pass --force to replace it")
    if file:
        if owned is not None and not owned(path):
            raise RepskipError(f"refusing to replace {path}: repskip did not write it; choose another output")
        return
    if path.is_symlink():
        raise RepskipError(f"refusing to replace {path}: it is a symbolic link; choose another output")
    if any(path.iterdir()) and not (written_by_repskip(path) or (owned is not None and owned(path))):
        raise RepskipError(
            f"refusing to replace {path}: it holds files repskip did not write (no {MARKER}); "
            "choose another output or empty it yourself"
        )


# --- debris of killed runs ---------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, from /proc), or None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that made a partial output still runs (True when unsure)."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's run on a shared disk: not ours to judge
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = owner.get("started")
    return started is None or _process_start(pid) in (None, started)


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}


def clean_debris(path: Path) -> list[Path]:
    """Remove what killed runs left beside ``path``: partial folders and files whose process
    is gone. A previous output set aside during a swap is put back if nothing replaced it."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        name = entry.name
        partial = name.startswith(f".{path.name}.partial-")
        replaced = name.startswith(f".{path.name}.replaced-")
        if not (partial or replaced):
            continue
        if entry.is_dir() and not entry.is_symlink():
            try:
                owner = json.loads((entry / PARTIAL_MARKER).read_text())
            except (OSError, ValueError):
                owner = None
            if owner is None:
                if partial and not any(entry.iterdir()):  # killed before its marker was written
                    with suppress(OSError):
                        entry.rmdir()
                        removed.append(entry)
                continue
            if _alive(owner):
                continue
            if replaced and not path.exists():
                (entry / PARTIAL_MARKER).unlink()
                entry.rename(path)  # the swap was cut short: the old output goes back
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif entry.is_file() and partial:
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive({"pid": int(pid), "host": socket.gethostname()}):
                with suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _mark(folder: Path, command: str) -> None:
    from . import __version__

    record = {"schema_version": 1, "kind": "repskip.output", "command": command, "repskip": __version__,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def _failed(path: Path, exc: OSError) -> RepskipError:
    return RepskipError(f"writing {path} failed ({exc.strerror or exc}); nothing was written there")


# --- writing -------------------------------------------------------------------------------------
@contextmanager
def atomic_dir(path: Path, force: bool, inputs: Sequence[Path] = (), command: str = "repskip") -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``path`` only if the block succeeds.

    On any failure (an exception, SIGTERM or Ctrl-C through the CLI) the temporary folder
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_output(path, force, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_debris(path)
    except OSError as exc:
        raise _failed(path, exc) from None
    check_output(path, force, inputs)  # a previous output put back by the clean-up counts
    try:
        tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).write_text(json.dumps(_owner_record()))
    except OSError as exc:
        raise _failed(path, exc) from None
    try:
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        _mark(tmp, command)
        if path.exists():  # swap, then delete the old one: never a moment without either
            trash = path.parent / f".{path.name}.replaced-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            # owned before it moves, so that a run killed mid-swap is undone by the next one
            (path / PARTIAL_MARKER).write_text(json.dumps(_owner_record()))
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _failed(path, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file beside ``path`` and rename it into place (the caller has checked
    that ``path`` may be written). A failure leaves the old file, or none, and says why."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_debris(path)
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink()
        raise _failed(path, exc) from None
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def ensure_dir(path: Path, inputs: Sequence[Path] = (), command: str = "repskip",
               owned: Callable[[Path], bool] | None = None) -> None:
    """A folder that a resumable command (verify) writes into over several runs: created with
    the marker, or reused when repskip made it (``owned``: recognises the command's folders
    from before the marker); a folder of someone else's files is refused."""
    path = Path(path)
    check_output(path, force=True, inputs=inputs, owned=owned)
    try:
        if path.is_dir():
            if not (path / MARKER).is_file():
                _mark(path, command)  # empty, or a pre-marker output of ours
            return
        path.mkdir(parents=True, exist_ok=True)  # ranks of one run may race here
        _mark(path, command)
    except OSError as exc:
        raise _failed(path, exc) from None


# --- signals -----------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every temporary output is removed."""


def exit_cleanly_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into an exception (the CLI calls this), so that ``atomic_dir``
    and ``write_atomic`` clean up on the way out; a SIGHUP already ignored (nohup) stays so."""

    def handler(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)
