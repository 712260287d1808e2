"""The sandbox as a sample sees it: correct code passes, wrong code fails, the limits end what
runs too long, allocates too much or prints too much; the audit-hook guard answers first
where it applies; and where the platform cannot isolate, nothing runs unless the user said
so. tests/test_security.py tries to break out of it."""

import struct
import sys
import time

import pytest

from repskip.verify import sandbox
from repskip.errors import RepskipError
from repskip.verify.sandbox import Limits, run_python

FAST = Limits(timeout_s=3, memory_mb=512)

needs_isolation = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is built on Linux namespaces")


@pytest.fixture
def no_isolation(monkeypatch):
    """This machine as one without user namespaces."""
    monkeypatch.setattr(sandbox, "_ISOLATION", sandbox.Isolation(False, reason="user namespaces are disabled"))


@needs_isolation
def test_correct_code_passes_and_wrong_code_fails():
    ok = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", FAST)
    assert ok.passed and ok.status == "passed"
    bad = run_python("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.detail


@needs_isolation
def test_an_endless_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", Limits(timeout_s=1.5))
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - start < 4


@needs_isolation
def test_unbounded_allocation_fails_the_sample():
    res = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50_000_000))\n", Limits(timeout_s=10, memory_mb=256))
    assert not res.passed and "MemoryError" in res.detail


@needs_isolation
def test_output_past_the_cap_ends_the_sample():
    res = run_python("print('x' * 5000)\n", Limits(timeout_s=5, output_kb=4))
    assert not res.passed and "output over 4 KiB" in res.detail
    assert run_python("print('x' * 3000)\n", Limits(timeout_s=5, output_kb=4)).passed


@needs_isolation
def test_file_size_and_scratch_space_are_capped():
    big_file = "open('big', 'wb').write(b'x' * (3 << 20))\n"
    assert not run_python(big_file, Limits(file_size_mb=2)).passed
    assert run_python(big_file, Limits(file_size_mb=4)).passed
    many = "for i in range(6):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n"
    res = run_python(many, Limits(file_size_mb=2, scratch_mb=4))
    assert not res.passed and "No space left" in res.detail


@needs_isolation
def test_the_scratch_folder_is_usable_and_fresh_for_each_sample():
    res = run_python("open('scratch.txt', 'w').write('hi')\nassert open('scratch.txt').read() == 'hi'\n", FAST)
    assert res.passed, res.detail
    assert run_python("import os\nassert not os.path.exists('scratch.txt')\n", FAST).passed


@needs_isolation
def test_threads_work_new_processes_do_not():
    threads = ("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]\n"
               "[t.start() for t in ts]\n[t.join() for t in ts]\nassert sorted(out) == [0, 1, 2, 3]\n")
    assert run_python(threads, FAST).passed
    # with the guard off, the seccomp filter still refuses to fork
    fork = sandbox._run("import os\nos.fork()\n", FAST, bwrap=sandbox.isolation().bwrap,
                        seccomp=sandbox.isolation().seccomp, guard=False)
    assert not fork.passed and "Operation not permitted" in fork.detail


@pytest.mark.parametrize("program", [
    "print(open('/etc/passwd').read())",
    "import os\nprint(os.listdir('/'))",
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import os\nos.system('echo hi')",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.fork()",
    "import os\nos.remove('/usr/lib/os.py')",
    "import ctypes",
])
@needs_isolation
def test_the_guard_answers_first_inside_the_sandbox(program):
    res = run_python(program, FAST)
    assert not res.passed and "not allowed" in res.detail


@needs_isolation
def test_secrets_in_the_environment_are_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    res = run_python("import os\nassert 'HF_TOKEN' not in os.environ, 'leaked'\nassert os.environ['HOME'] == '/tmp'\n", FAST)
    assert res.passed, res.detail


@needs_isolation
def test_imports_from_the_standard_library_work():
    res = run_python("import math, re, heapq, collections, itertools, functools, json, hashlib, decimal, fractions\n"
                     "P = collections.namedtuple('P', 'a b')\nassert math.gcd(12, 18) == 6 and P(1, 2).b == 2\n", FAST)
    assert res.passed, res.detail


@needs_isolation
def test_a_long_program_and_odd_text_reach_the_sample():
    program = "x = 0\n" + "x += 1\n" * 20000 + "assert x == 20000\nassert 'é' + '\\udcff' != ''\n"
    assert run_python(program, FAST).passed


def test_without_isolation_code_benchmarks_refuse_with_the_fix(no_isolation):
    with pytest.raises(RepskipError) as err:
        run_python("pass", FAST)
    message = str(err.value)
    assert "user namespaces are disabled" in message and "--allow-unsafe-code-execution" in message
    assert "\n" not in message


def test_unsafe_execution_must_be_asked_for_and_says_so(no_isolation):
    with sandbox.allow_unsafe_execution(), pytest.warns(UserWarning, match="WITHOUT OS isolation"):
        res = run_python("assert 1 + 1 == 2\n", FAST)
    assert res.passed
    with pytest.raises(RepskipError):  # the permission ends with the block
        run_python("pass", FAST)


def test_a_platform_without_namespaces_is_reported(monkeypatch):
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    iso = sandbox.isolation()
    assert not iso.available and "Linux" in iso.reason


def test_the_seccomp_filter_checks_the_architecture_first_and_ends_in_returns():
    for machine, arch in (("x86_64", 0xC000003E), ("aarch64", 0xC00000B7)):
        prog = sandbox.seccomp_program(machine)
        insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
        assert insns[0] == (0x20, 0, 0, 4) and insns[1][0] == 0x15 and insns[1][3] == arch
        assert insns[-1][0] == 0x06  # every path ends in a return
        for i, (op, jt, jf, _) in enumerate(insns):  # every jump lands inside the program
            if op & 0x07 == 0x05:
                assert i + 1 + max(jt, jf) < len(insns)
    assert sandbox.seccomp_program("riscv64") is None


@needs_isolation
def test_stopping_the_process_that_runs_a_sample_ends_the_sample_too(tmp_path):
    """What a stopped bench does to its verify (SIGTERM): the sandbox and everything in it go
    with it, none left running on the host."""
    import signal
    import subprocess

    psutil = pytest.importorskip("psutil")
    host = subprocess.Popen([sys.executable, "-c",
                             "from repskip.verify.sandbox import Limits, run_python\n"
                             "run_python('import time\\ntime.sleep(60)\\n', Limits(timeout_s=60))\n"])
    deadline = time.monotonic() + 30
    inside = []
    while time.monotonic() < deadline:  # wait until the sample runs: bwrap and the sandboxed python
        inside = psutil.Process(host.pid).children(recursive=True)
        if len(inside) >= 2:
            break
        time.sleep(0.2)
    assert len(inside) >= 2, "the sample never started"
    time.sleep(0.5)
    host.send_signal(signal.SIGTERM)
    host.wait(timeout=10)
    time.sleep(2)
    alive = [p for p in inside if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after their parent was stopped: {[p.cmdline() for p in alive]}"
