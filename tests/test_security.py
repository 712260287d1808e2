"""Hostile programs through the HumanEval scorer: each tries one escape from the sandbox.

Every program first switches off the in-process audit-hook guard (the trick a completion can
play, since the guard lives in its interpreter), so what contains it is the OS isolation
alone. Each program is a fenced "solution" to HumanEval/2 that returns the right answer only
if its escape worked: a contained attack scores pass@1 = 0. After each run the test checks
the host: the canary files (content, mode, mtime, listing), a victim process, listening
sockets on the host, leftover sandbox processes, and the parent's own memory.
"""

from __future__ import annotations

import os
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from repskip.verify import sandbox
from repskip.benchmark import get_benchmark

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is built on Linux namespaces")

# The sandbox's wall-clock limit. An attack that a resource limit stops must end before it;
# 5 s leaves room for a loaded CI machine (a memory bomb once took 3.004 s against 3).
TIMEOUT_S = 5
SECRET = "hunter2-canary"
ENV_SECRET = "hf_secret_canary_0123"

# Switches the audit-hook guard off from inside (it is a function of the boot script's
# __main__ module), then proves it: listing "/" is something only the guard refuses.
PRELUDE = """\
import os, sys
def _off(event, args):
    return None
sys.modules["__main__"]._guard.__code__ = _off.__code__
os.listdir("/")
ESCAPED = False
"""

# name -> attack. It sets ESCAPED = True only if the escape worked; raising is also a failure.
# $canary, $secret, $victim, $parent, $port, $udp, $unix, $abstract are filled in per test.
ATTACKS = {
    # --- reading the host -------------------------------------------------------------------
    "read_host_file": "ESCAPED = open('$secret').read() == '" + SECRET + "'",
    "read_etc_passwd": "ESCAPED = 'root:' in open('/etc/passwd').read()",
    "list_host_folder": "ESCAPED = 'secret.txt' in os.listdir('$canary')",
    "walk_for_the_secret": "ESCAPED = any('secret.txt' in files for _, _, files in os.walk('/'))",
    "environment_secrets": "ESCAPED = '" + ENV_SECRET + "' in repr(dict(os.environ))",
    "parent_environ_via_proc": "ESCAPED = b'" + ENV_SECRET + "' in open('/proc/$parent/environ', 'rb').read()",
    "proc_self_mem": "fh = open('/proc/self/mem', 'r+b'); ESCAPED = True",
    "proc_root_of_init": "ESCAPED = 'secret.txt' in os.listdir('/proc/1/root$canary')",
    # --- writing, deleting, renaming, linking outside ------------------------------------------
    "write_new_file": "open('$canary/pwned.txt', 'w').write('x'); ESCAPED = True",
    "overwrite_file": "open('$secret', 'w').write('x'); ESCAPED = True",
    "append_to_file": "open('$secret', 'a').write('x'); ESCAPED = True",
    "delete_file": "os.remove('$secret'); ESCAPED = True",
    "rename_file": "os.rename('$secret', '$canary/moved.txt'); ESCAPED = True",
    "truncate_file": "os.truncate('$secret', 0); ESCAPED = True",
    "chmod_file": "os.chmod('$secret', 0o777); ESCAPED = True",
    "mkdir_outside": "os.mkdir('$canary/newdir'); ESCAPED = True",
    "rmtree_outside": "import shutil; shutil.rmtree('$canary'); ESCAPED = True",
    "hard_link_then_write": "os.link('$secret', '/tmp/l'); open('/tmp/l', 'w').write('x'); ESCAPED = True",
    "symlink_then_write": "os.symlink('$secret', '/tmp/s'); open('/tmp/s', 'w').write('x'); ESCAPED = True",
    "patch_the_stdlib": "open(os.__file__, 'a').write('# owned'); ESCAPED = True",
    "fill_dev_shm": "open('/dev/shm/x', 'wb').write(b'x' * 1024); ESCAPED = True",
    # --- running binaries and processes --------------------------------------------------------
    "subprocess_shell": "import subprocess; subprocess.run(['/bin/sh', '-c', 'touch $canary/pwned'], check=True); "
                        "ESCAPED = True",
    "subprocess_interpreter": "import subprocess; subprocess.run([sys.executable, '-c', "
                              "\"open('$canary/pwned', 'w')\"], check=True); ESCAPED = True",
    "posixsubprocess_fork_exec": "import subprocess, _posixsubprocess; p = subprocess.Popen([sys.executable, '-V']); "
                                 "ESCAPED = p.wait() == 0",
    "posix_spawn": "pid = os.posix_spawn(sys.executable, [sys.executable, '-V'], {}); ESCAPED = pid > 0",
    "os_system": "ESCAPED = os.system('touch $canary/pwned') == 0",
    "execv_interpreter": "os.execv(sys.executable, [sys.executable, '-c', \"open('$canary/pwned', 'w').write('x')\"])",
    "ctypes_libc_system": "import ctypes; ESCAPED = ctypes.CDLL(None).system(b'touch $canary/pwned') == 0",
    # --- network ---------------------------------------------------------------------------------
    "tcp_to_host_listener": "import socket; s = socket.create_connection(('127.0.0.1', $port), timeout=2); "
                            "s.sendall(b'pwned'); ESCAPED = True",
    "tcp_to_the_internet": "import socket; socket.create_connection(('1.1.1.1', 443), timeout=2); ESCAPED = True",
    "udp_to_host_listener": "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                            "u.sendto(b'pwned', ('127.0.0.1', $udp)); u.sendto(b'pwned', ('10.0.2.2', $udp)); "
                            "ESCAPED = True",
    "dns_lookup": "import socket; ESCAPED = bool(socket.getaddrinfo('pypi.org', 443))",
    "unix_socket_on_host": "import socket; s = socket.socket(socket.AF_UNIX); s.connect('$unix'); "
                           "s.sendall(b'pwned'); ESCAPED = True",
    "abstract_unix_socket": "import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0$abstract'); "
                            "s.sendall(b'pwned'); ESCAPED = True",
    # --- other processes ---------------------------------------------------------------------------
    "kill_victim": "import signal; os.kill($victim, signal.SIGKILL); ESCAPED = True",
    "kill_parent": "import signal; os.kill($parent, signal.SIGKILL); ESCAPED = True",
    "kill_everything": "import signal; os.kill(-1, signal.SIGKILL); ESCAPED = True",
    "killpg_parent_group": "import signal; os.killpg(os.getpgid($parent), signal.SIGKILL); ESCAPED = True",
    "pidfd_send_signal": "import signal; signal.pidfd_send_signal(os.pidfd_open($victim), signal.SIGKILL); "
                         "ESCAPED = True",
    "ptrace_victim": "import ctypes; ESCAPED = ctypes.CDLL(None).ptrace(16, $victim, 0, 0) == 0",
    "process_vm_readv": "import ctypes\n"
                        "buf = ctypes.create_string_buffer(8)\n"
                        "local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)\n"
                        "remote = (ctypes.c_void_p * 2)(0x400000, 8)\n"
                        "ESCAPED = ctypes.CDLL(None).process_vm_readv($victim, local, 1, remote, 1, 0) > 0",
    # --- kernel surface and the limits ----------------------------------------------------------
    "nested_user_namespace": "import ctypes; ESCAPED = ctypes.CDLL(None).unshare(0x10000000) == 0",
    "mount_proc": "import ctypes; ESCAPED = ctypes.CDLL(None).mount(b'proc', b'/tmp', b'proc', 0, None) == 0",
    "chroot": "import ctypes; ESCAPED = ctypes.CDLL(None).chroot(b'/tmp') == 0",
    "x32_syscall_table": "import ctypes, platform\n"
                         "ESCAPED = platform.machine() == 'x86_64' and ctypes.CDLL(None).syscall(0x40000000 | 39) > 0",
    "raise_own_limits": "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1)); ESCAPED = True",
    "fork_bomb": "n = 0\nwhile n < 100000:\n    if os.fork() == 0:\n        while True: pass\n    n += 1\n"
                 "ESCAPED = True",
    "setsid_double_fork_outlives_timeout": "import time\n"
                                           "if os.fork() == 0:\n    os.setsid()\n"
                                           "    if os.fork() == 0:\n        time.sleep(60); "
                                           "open('$canary/late.txt', 'w')\n    os._exit(0)\n"
                                           "ESCAPED = True",
    "thread_bomb": "import threading, time\nn = 0\ntry:\n    while n < 100000:\n"
                   "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); n += 1\n"
                   "except RuntimeError:\n    pass\nESCAPED = n >= 100000",
    "memory_bomb": "chunks = []\ntry:\n    while len(chunks) < 64:\n        chunks.append(bytearray(256 << 20))\n"
                   "except MemoryError:\n    pass\nESCAPED = len(chunks) * 256 > 4096",
    "fill_the_scratch_disk": "n = 0\ntry:\n    while n < 4096:\n"
                             "        open(f'/tmp/fill{n}', 'wb').write(b'x' * (1 << 20)); n += 1\n"
                             "except OSError:\n    pass\nESCAPED = n >= 4096",
    "one_huge_file": "f = open('/tmp/big', 'wb')\nfor _ in range(1024):\n    f.write(b'x' * (1 << 20))\n"
                     "ESCAPED = True",
    "endless_stdout": "while True:\n    sys.stdout.write('x' * 65536)",
    "endless_stderr": "while True:\n    sys.stderr.write('x' * 65536)",
    "sleep_past_the_timeout": "import time; time.sleep(3600); ESCAPED = True",
    "busy_threads_past_the_timeout": "import threading\n"
                                     "def spin():\n    while True: pass\n"
                                     "for _ in range(4): threading.Thread(target=spin).start()\nspin()",
}

# Programs that end by the wall-clock limit rather than by an error.
SLOW = {"sleep_past_the_timeout", "busy_threads_past_the_timeout"}


def completion(attack: str, fields: dict) -> str:
    body = string.Template(attack).substitute(fields)
    return ("Here is my solution:\n```python\n" + PRELUDE + body + "\n\n"
            "def truncate_number(number: float) -> float:\n"
            "    return number % 1.0 if ESCAPED else -1.0\n```\n")


@pytest.fixture(scope="module")
def isolated():
    iso = sandbox.isolation()
    if not iso.available:
        pytest.fail(f"the sandbox cannot be built on this machine: {iso.reason}")
    return iso


@pytest.fixture(scope="module")
def bench_item():
    bench = get_benchmark("humaneval", timeout_s=TIMEOUT_S)
    item = next(i for i in bench.load(None) if i.id == "HumanEval/2")
    return bench, item


@pytest.fixture(scope="module")
def victim():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    yield proc
    proc.kill()
    proc.wait()


class Listeners:
    """A TCP, a UDP, a path and an abstract Unix socket on the host, recording any contact."""

    def __init__(self, folder: Path):
        self.contacts: list[str] = []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", 0))
        self.unix_path = str(folder / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen()
        self.abstract_name = f"repskip-test-{os.getpid()}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen()
        self.stop = False
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True)
                        for s in (self.tcp, self.unix, self.abstract)]
        self.threads.append(threading.Thread(target=self._recv, daemon=True))
        for t in self.threads:
            t.start()

    def _accept(self, sock):
        sock.settimeout(0.1)
        while not self.stop:
            try:
                conn, _ = sock.accept()
                self.contacts.append(f"connection on {sock}")
                conn.close()
            except (TimeoutError, OSError):
                continue

    def _recv(self):
        self.udp.settimeout(0.1)
        while not self.stop:
            try:
                self.contacts.append(f"datagram {self.udp.recv(64)!r}")
            except (TimeoutError, OSError):
                continue

    def close(self):
        self.stop = True
        for t in self.threads:
            t.join()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.lstat().st_mode, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if not p.is_socket()}


def sandbox_processes() -> list[psutil.Process]:
    """Live (non-zombie) processes of any sandbox: bwrap, or the interpreter running the boot script."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and ("bwrap" in cmd or "-S -s -B -X utf8 -c" in cmd):
            found.append(proc)
    return found


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_program_is_contained(name, isolated, bench_item, victim, tmp_path, monkeypatch):
    bench, item = bench_item
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret.txt").write_text(SECRET)
    (canary / "keep").mkdir()
    (canary / "keep" / "notes.txt").write_text("keep me")
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    listeners = Listeners(tmp_path)
    fields = dict(canary=canary, secret=canary / "secret.txt", victim=victim.pid, parent=os.getpid(),
                  port=listeners.tcp.getsockname()[1], udp=listeners.udp.getsockname()[1],
                  unix=listeners.unix_path, abstract=listeners.abstract_name)
    before_files = snapshot(canary)
    rss_before = psutil.Process().memory_info().rss
    start = time.monotonic()
    try:
        score = bench.score(item, completion(ATTACKS[name], fields))
    finally:
        elapsed = time.monotonic() - start
        time.sleep(0.2)  # anything that escaped the teardown would still be running now
        listeners.close()
    assert score == {"pass@1": 0.0}, f"{name}: the attack reports it escaped"
    assert snapshot(canary) == before_files, f"{name}: files outside the sandbox changed"
    assert victim.poll() is None, f"{name}: the victim process was killed"
    assert not listeners.contacts, f"{name}: reached the host's sockets: {listeners.contacts}"
    assert not sandbox_processes(), f"{name}: sandbox processes outlived the run"
    assert psutil.Process().memory_info().rss - rss_before < 64 * 2**20, f"{name}: the parent's memory grew"
    limit = TIMEOUT_S + 2 if name in SLOW else TIMEOUT_S
    assert elapsed < limit, f"{name}: took {elapsed:.1f} s"


def test_the_prelude_really_switches_the_guard_off(isolated, bench_item):
    """The suite tests the OS layer only if the guard is off: with it off, what only the
    guard refuses (listing "/", a socket object) works, and the sample can pass."""
    bench, item = bench_item
    probe = "import socket\nsocket.socket().close()\nESCAPED = '" + "tmp" + "' in os.listdir('/')"
    assert bench.score(item, completion(probe, {})) == {"pass@1": 1.0}


def test_there_are_at_least_thirty_attacks():
    assert len(ATTACKS) >= 30
