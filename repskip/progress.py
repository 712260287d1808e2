"""Progress a person can follow, wherever the output goes.

On a terminal: rich bars. Anywhere else (a log file, CI, ``nohup``, ``| tee``): plain lines on
stderr, one when a stage starts, one at every tenth of its work or every ``interval`` seconds,
whichever comes first (a heartbeat thread keeps the lines coming while one step is slow), and
one when it ends::

    [12:01:07] analyse: analysing 19/64 sequences (30%), 2.4 sequences/s, ETA 0:00:19

And, when given a path, a status file (JSON, rewritten atomically with each line) that says
which stage a run is in, so that a long run can be watched from another shell.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

STATUS_SCHEMA = 1
STATUS_NAME = "status.json"
TENTHS = 10


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Reporter:
    """The progress of one command: stages, each with done/total work.

    ``plain``: plain lines (default: when ``stream`` is not a terminal). ``status``: a file
    kept up to date with the stage, its progress and the run's state."""

    def __init__(self, command: str, *, console: Any = None, stream: TextIO | None = None,
                 plain: bool | None = None, status: Path | None = None, interval: float = 30.0):
        import sys

        self.command = command
        self.console = console
        self.stream = stream if stream is not None else sys.stderr
        self.plain = (not self.stream.isatty()) if plain is None else plain
        self.status_path = Path(status) if status is not None else None
        self.interval = interval
        self.started = _now()
        self.stages: list[dict] = []
        self.message = ""
        self._lock = threading.Lock()

    # --- the status file --------------------------------------------------------------------
    def _write_status(self, state: str, stage: dict | None) -> None:
        if self.status_path is None or not self.status_path.parent.is_dir():
            return
        from .outputs import write_atomic

        record = {"schema_version": STATUS_SCHEMA, "kind": "repskip.status", "command": self.command,
                  "state": state, "pid": os.getpid(), "started": self.started, "updated": _now(),
                  "message": self.message,
                  "stage": stage and {k: stage[k] for k in ("name", "done", "total", "unit")},
                  "stages": [{"name": s["name"], "seconds": round(s.get("seconds", time.monotonic() - s["t0"]), 1)}
                             for s in self.stages]}
        try:
            write_atomic(self.status_path, json.dumps(record, indent=1) + "\n")
        except Exception:  # a status file must never stop the work  # noqa: BLE001
            pass

    def move_status(self, path: Path | None) -> None:
        """Keep the status file at ``path`` from now on (the run folder was renamed)."""
        self.status_path = Path(path) if path is not None else None

    def finish(self, state: str = "done") -> None:
        self.message = state
        self._write_status(state, None)

    def tracker(self, unit: str) -> tuple[Callable[[str, int, int], None], Callable[[], None]]:
        """``update(label, done, total, detail="")`` for work whose stages are named as they
        come (a stage per label, started by its first update), and ``close()`` to end the
        last one. A stage's clock starts at its first update, so the work that update counts
        (the first step, or a resumed run's earlier steps) stays out of its rate and ETA."""
        from contextlib import ExitStack

        stack = ExitStack()
        current: dict = {}

        def update(label: str, done: int, total: int, detail: str = "") -> None:
            if current.get("label") != label:
                stack.close()
                current["label"] = label
                current["update"] = stack.enter_context(self.stage(label, unit, total, start=done))
            current["update"](done, total, detail)

        return update, stack.close

    # --- lines -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line about the run (plain mode: timestamped on stderr; terminal: dim), also
        kept in the status file."""
        self.message = text
        self._write_status("running", None)
        self._print(text)

    def _print(self, text: str) -> None:
        if self.plain:
            print(f"[{time.strftime('%H:%M:%S')}] {self.command}: {text}", file=self.stream, flush=True)
        elif self.console is not None:
            self.console.print(f"[dim]{text}[/]", highlight=False)

    def _line(self, stage: dict) -> str:
        done, total, unit = stage["done"], stage["total"], stage["unit"]
        detail = f", {stage['detail']}" if stage.get("detail") else ""
        elapsed = time.monotonic() - stage["t0"]
        text = f"{stage['name']} {done}" + (f"/{total}" if total else "") + f" {unit}"
        if total:
            text += f" ({done / total:.0%})"
        if done > stage["start"] and elapsed > 0:
            rate = (done - stage["start"]) / elapsed
            text += f", {rate:.3g} {unit}/s" if rate >= 0.1 else f", {1 / rate:.3g} s per {unit.rstrip('s')}"
            if total and done < total:
                text += f", ETA {_clock((total - done) / rate)}"
        if total and done >= total:
            text += f", done in {_clock(elapsed)}"
        return text + detail

    def _emit(self, stage: dict) -> None:
        stage["last"] = time.monotonic()
        stage["next_tenth"] = (stage["done"] * TENTHS // stage["total"] + 1) if stage["total"] else None
        self._print(self._line(stage))
        self._write_status("running", stage)

    @contextmanager
    def stage(self, name: str, unit: str = "steps", total: int | None = None,
              start: int = 0) -> Iterator[Callable[[int, int], None]]:
        """A stage of work; yields ``update(done, total, detail="")`` (``detail``: a short
        note shown with the count, such as the current loss). ``start``: work already done
        when the stage begins (a resumed run's), in the count but not in the rate or ETA."""
        stage = {"name": name, "unit": unit, "done": start, "start": start, "total": total, "t0": time.monotonic()}
        self.stages.append(stage)
        with self._lock:
            self._emit(stage)
        if self.plain:
            stop = threading.Event()

            def heartbeat() -> None:
                while not stop.wait(min(self.interval, 5.0)):
                    with self._lock:
                        if time.monotonic() - stage["last"] >= self.interval:
                            self._emit(stage)

            beat = threading.Thread(target=heartbeat, daemon=True)
            beat.start()

            def update(done: int, total: int, detail: str = "") -> None:
                with self._lock:
                    stage["done"], stage["total"], stage["detail"] = done, total or stage["total"], detail
                    tenth = done * TENTHS // stage["total"] if stage["total"] else None
                    due = time.monotonic() - stage["last"] >= self.interval
                    if due or (tenth is not None and (stage["next_tenth"] is None or tenth >= stage["next_tenth"])):
                        self._emit(stage)

            try:
                yield update
            finally:
                stop.set()
                beat.join()
                stage["seconds"] = time.monotonic() - stage["t0"]
                if stage["total"] is None or stage["done"] < stage["total"]:
                    with self._lock:
                        self._print(self._line(stage) + f" after {_clock(stage['seconds'])}")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                       TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=self.console, transient=False)
        task = bar.add_task(name, total=total, completed=start, detail="")
        throttle = {"t": 0.0, "tenth": -1}

        def update(done: int, total: int, detail: str = "") -> None:
            bar.update(task, completed=done, total=total, detail=detail)
            stage["done"], stage["total"], stage["detail"] = done, total, detail
            tenth = done * TENTHS // total if total else -1
            if tenth != throttle["tenth"] or time.monotonic() - throttle["t"] >= self.interval:
                throttle.update(t=time.monotonic(), tenth=tenth)
                self._write_status("running", stage)

        try:
            with bar:
                yield update
        finally:
            stage["seconds"] = time.monotonic() - stage["t0"]
