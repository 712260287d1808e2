"""python-stdlib: the standard library's source as calibration and healing text, with no
download: whole top-level definitions for calibration, whole files for healing."""

from __future__ import annotations

import ast
import json
import sys

import yaml
from click.testing import CliRunner

from repskip import corpora
from repskip.analyze import calibration
from repskip.cli import main
from repskip.train.data import read_documents


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_definitions_keep_decorators_with_what_they_decorate():
    source = '''"""A module."""
import os

@functools.cache
@other(
    1,
)
def f(x):
    return x

async def g():
    pass
    def inner():
        pass

class C:
    def method(self):
        pass
X = 1
'''
    blocks = corpora.definitions(source)
    assert [b.splitlines()[0] for b in blocks] == ['"""A module."""', "@functools.cache", "async def g():", "class C:"]
    assert "def f(x):" in blocks[1] and "def inner():" in blocks[2] and blocks[3].endswith("X = 1")


def test_the_stdlib_corpus_is_real_code_without_the_test_suites():
    files = corpora.stdlib_files()
    assert len(files) > 300 and files == sorted(files)
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(f.parts) for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    texts = corpora.texts("python-stdlib")
    assert len(texts) > 5000
    defs = [t for t in texts if t.startswith(("def ", "class ", "async def ", "@"))][:300]
    assert len(defs) == 300
    for text in defs:  # a top-level definition with its decorators is a module of its own
        ast.parse(text)


def test_calibration_from_the_stdlib_is_seeded_and_hashed(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    one, two = (calibration.build(tokenizer, "python-stdlib", num_samples=16, max_length=64, seed=3) for _ in "ab")
    other = calibration.build(tokenizer, "python-stdlib", num_samples=16, max_length=64, seed=4)
    assert one.sequences == two.sequences and one.hash == two.hash != other.hash
    assert one.source == "python-stdlib" and len(one.sequences) == 16
    res = run("analyze", tiny["llama"], "-o", tmp_path / "a", "--calib", "python-stdlib", "-k", "1",
              "--strategy", "block-influence", "--repair", "none", "--num-samples", "8", "--max-length", "32")
    assert res.exit_code == 0, res.output
    recipe = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert recipe["calibration"]["source"] == "python-stdlib"
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert analysis["calibration"]["hash"] == recipe["resolved"]["calibration_hash"]


def test_healing_reads_each_stdlib_file_as_a_document():
    docs, label = read_documents("python-stdlib")
    assert label == f"python-stdlib (Python {sys.version.split()[0]})"
    readable = []
    for f in corpora.stdlib_files():
        try:
            readable.append(f.read_text("utf-8"))
        except UnicodeDecodeError:
            pass
    assert docs == [t for t in readable if t.strip()] and len(docs) > 300
    assert any("def dumps(" in d for d in docs)
