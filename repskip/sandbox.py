"""Run untrusted generated code (HumanEval, MBPP samples) in a separate, limited process.

Each run gets its own Python process in a fresh temporary directory, with:
- CPU-time, address-space and file-size limits (setrlimit) and a wall-clock timeout that
  kills the whole process group, so a loop, a fork or an allocation spree ends the sample;
- an environment with nothing inherited but PATH and locale (no tokens, no proxies);
- no network: a new network namespace where the platform allows it (``unshare -n``), and in
  every case an audit hook that refuses sockets;
- no file access outside its directory: the audit hook refuses opening any path outside it,
  except reading the Python installation (needed to import the standard library).

This is containment for benchmark code written by a model, not a security boundary against
a determined attacker: run untrusted evaluations on a machine you can afford to lose.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Runs first in the child: installs the guard, then runs the program file.
_GUARD = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
_read_ok = tuple(os.path.realpath(p) for p in {read_ok!r})

def _inside(path, prefixes):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return any(real == p or real.startswith(p + os.sep) for p in prefixes)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _guard(event, args):
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        if isinstance(path, int):
            return
        writing = any(c in mode for c in "wax+") if mode else bool((flags or 0) & _WRITE_FLAGS)
        if _inside(path, (_root,)) or (not writing and _inside(path, _read_ok)):
            return
        raise PermissionError(f"sandbox: access to {{path!r}} is not allowed")
    if event in ("os.listdir", "os.scandir") and not (_inside(args[0] or ".", (_root,)) or _inside(args[0] or ".", _read_ok)):
        raise PermissionError(f"sandbox: listing {{args[0]!r}} is not allowed")
    if event.startswith("socket."):
        raise PermissionError("sandbox: network access is not allowed")
    if event in ("ctypes.dlopen", "ctypes.dlsym", "sys.addaudithook", "os.system", "subprocess.Popen",
                 "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg"):
        raise PermissionError(f"sandbox: {{event}} is not allowed")

sys.addaudithook(_guard)
_program = os.path.join(_root, "program.py")
with open(_program) as _fh:
    _code = compile(_fh.read(), _program, "exec")
del _fh
exec(_code, {{"__name__": "__main__", "__file__": _program}})
'''


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout", "error"
    detail: str
    seconds: float


def _read_ok_prefixes() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
    return sorted(p for p in paths if p)


def _limit(limits: Limits):
    def apply() -> None:
        os.setsid()  # its own process group: the timeout kills children too
        cpu = max(1, int(limits.timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        mem = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        size = limits.file_size_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


_NETNS: bool | None = None


def _netns_prefix() -> list[str]:
    """``unshare -rn`` when it works here (a fresh network namespace has no interfaces)."""
    global _NETNS
    if _NETNS is None:
        exe = shutil.which("unshare")
        _NETNS = bool(exe) and subprocess.run([exe, "-rn", "true"], capture_output=True).returncode == 0
    return ["unshare", "-rn"] if _NETNS else []


def run_python(program: str, limits: Limits = Limits()) -> RunResult:
    """Run ``program`` (Python source) under the limits; passed means exit code 0."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="repskip-sandbox-") as work:
        Path(work, "program.py").write_text(program)
        guard = _GUARD.format(read_ok=_read_ok_prefixes())
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = [*_netns_prefix(), sys.executable, "-I", "-S", "-c", guard]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_limit(limits))
        try:
            out, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return RunResult(False, "timeout", f"killed after {limits.timeout_s:g} s", time.monotonic() - start)
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return RunResult(True, "passed", "", seconds)
    tail = err.decode("utf-8", "replace").strip().splitlines()
    detail = tail[-1] if tail else f"exit code {proc.returncode}"
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode} ({detail})"
    return RunResult(False, "failed", detail[:300], seconds)
