"""Generated code runs contained: a sample that loops, allocates without bound, forks, reads
or writes outside its folder, or opens a socket fails that sample within its limit."""

import time

import pytest

from repskip.sandbox import Limits, run_python

FAST = Limits(timeout_s=3, memory_mb=512)


def test_correct_code_passes_and_wrong_code_fails():
    ok = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", FAST)
    assert ok.passed and ok.status == "passed"
    bad = run_python("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.detail


def test_an_endless_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", Limits(timeout_s=1.5))
    assert res.status in ("timeout", "failed") and not res.passed
    assert time.monotonic() - start < 10


def test_unbounded_allocation_fails_the_sample():
    res = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50_000_000))\n", Limits(timeout_s=10, memory_mb=256))
    assert not res.passed and "MemoryError" in res.detail


@pytest.mark.parametrize("program", [
    "print(open('/etc/passwd').read())",
    "import os\nprint(os.listdir('/root'))",
    "open('/tmp/repskip-sandbox-escape.txt', 'w').write('x')",
    "import os\nos.open('/tmp/repskip-sandbox-escape.txt', os.O_WRONLY | os.O_CREAT)",
])
def test_files_outside_the_sample_folder_are_out_of_reach(program, tmp_path):
    res = run_python(program, FAST)
    assert not res.passed and "not allowed" in res.detail
    import os

    assert not os.path.exists("/tmp/repskip-sandbox-escape.txt")


def test_its_own_folder_is_usable():
    res = run_python("open('scratch.txt', 'w').write('hi')\nassert open('scratch.txt').read() == 'hi'\n", FAST)
    assert res.passed, res.detail


@pytest.mark.parametrize("program", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import os\nos.system('echo hi')",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.fork()",
])
def test_network_and_processes_are_refused(program):
    res = run_python(program, FAST)
    assert not res.passed and "not allowed" in res.detail


def test_secrets_in_the_environment_are_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    res = run_python("import os\nassert 'HF_TOKEN' not in os.environ, 'leaked'\n", FAST)
    assert res.passed, res.detail


def test_imports_from_the_standard_library_work():
    res = run_python("import math, re, heapq, collections, itertools, functools\nassert math.gcd(12, 18) == 6\n", FAST)
    assert res.passed, res.detail
