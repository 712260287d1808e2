"""Every shell block of README.md and docs/*.md is run, or at least parsed, so the docs cannot
drift from the code.

A shell block is a fenced block in sh, bash, shell or console, or with no language when one of
its lines starts a command (``repskip``, ``.venv/bin/``, ``make``, ``cd``, ``git``, ``M=``).
An HTML comment on the line(s) right before the fence chooses what happens to it:

- nothing: ``run``. The file's run blocks are executed in order with bash (``set -euo
  pipefail``), in one temporary working directory per file, with this Python's bin folder
  first on PATH. ``PATH``/``BASE``/``MODEL`` as a command argument become a tiny random Llama
  checkpoint (tests/helpers.py), ``/tmp/d`` and ``/tmp/rs`` folders in the temporary
  directory, ``.venv/bin/`` this Python's bin folder, ``cd repskip`` the repository, and
  ``recipes/`` is linked in. A missing relative ``--data NAME=FILE`` or ``--calib FILE`` is
  made (small text).
- ``<!-- docs-test: parse-only REASON -->``: every ``repskip`` command is parsed by click (an
  unknown command or option, or a bad value, fails; nothing runs), every ``python bench/X.py
  ARGS`` by the script's own argparse parser, ``python -c CODE`` is compiled, ``make T``
  needs a target T in the Makefile. Lines that cannot be checked (``cd``, ``git``, ``pip``)
  are listed in the test's output. For what is slow (bench scripts, SmolLM2), or needs the
  network, a GPU or state this page does not build.
- ``<!-- docs-test: skip REASON -->``: neither run nor parsed.
- ``<!-- docs-test: file PATH -->`` before a non-shell block (a recipe, say): in the run of
  its file, the block is written to PATH (substituted as above) when the run reaches it.

Each run and parse-only block is also parsed in the fast tier (``test_block``); the run of a
file is one test (``test_doc_runs``), marked slow when it starts more than a few processes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # the venv's bin: repskip's console script lives beside python

SHELL_LANGS = {"sh", "bash", "shell", "console", ""}
# An untagged block is a shell block only when a line starts a command like these.
COMMAND_START = re.compile(r"^(\$\s+)?(repskip\b|\.venv/bin/|make\b|cd\b|git\b|M=)")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<mode>\S+)\s*(?P<arg>.*?)\s*-->", re.S)
SHELL_MODES = {"run", "parse-only", "skip"}
MODES = SHELL_MODES | {"file"}

BLOCK_TIMEOUT_S = 300  # per run block; a hang fails instead of stalling the suite
SLOW_AFTER = 2  # a file's run is marked slow when it starts more Python processes than this


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the body, dedented to the fence
    shell: bool
    mode: str  # run, parse-only, skip, file; run when no directive
    arg: str  # the reason, or the path of a file block
    directive_line: int | None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


# --- the markdown parser -----------------------------------------------------------------
def _directive_before(lines: list[str], fence: int) -> tuple[re.Match | None, int | None]:
    """The docs-test comment that ends on the line right before line ``fence`` (0-based)."""
    end = fence - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return None, None
    start = end
    while start > 0 and "<!--" not in lines[start]:
        start -= 1
    m = DIRECTIVE.search("\n".join(lines[start:end + 1]))
    return (m, start + 1) if m else (None, None)


def _is_shell(lang: str, body: list[str]) -> bool:
    if lang not in SHELL_LANGS:
        return False
    code = [ln.strip() for ln in body if ln.strip() and not ln.strip().startswith("#")]
    if lang == "":
        return any(COMMAND_START.match(ln) for ln in code)
    if lang == "console":
        return any(ln.startswith("$ ") for ln in code)
    return bool(code)


def parse_markdown(path: Path) -> tuple[list[Block], list[int]]:
    """The fenced blocks of ``path`` that are shell blocks or carry a directive, and the lines
    of docs-test comments that stand before no fence."""
    rel = path.relative_to(REPO).as_posix()
    lines = path.read_text("utf-8").splitlines()
    blocks, used = [], set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"].expandtabs())
        lang = m["info"].split()[0].lower() if m["info"].strip() else ""
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[indent:] if not ln[:indent].strip() else ln.lstrip() for ln in lines[i + 1:j]]
        directive, at = _directive_before(lines, i)
        shell = _is_shell(lang, body)
        if shell or directive:
            if directive:
                used.add(at)
            blocks.append(Block(
                doc=rel, line=i + 1, lang=lang, text="\n".join(body) + "\n", shell=shell,
                mode=directive["mode"] if directive else "run", arg=directive["arg"] if directive else "",
                directive_line=at,
            ))
        i = j + 1
    stray = [n for n, ln in enumerate(lines, 1) if "docs-test:" in ln and n not in used
             and not any(b.directive_line and b.directive_line <= n < b.line for b in blocks)]
    return blocks, stray


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in parse_markdown(doc)[0]]


def command_lines(block: Block) -> list[str]:
    """The block's logical command lines: continuations joined, console prompts stripped,
    output and comment-only lines dropped."""
    raw = block.text.splitlines()
    if block.lang == "console":
        raw = [ln[2:] for ln in raw if ln.startswith("$ ")]
    out, cur = [], ""
    for ln in raw:
        if ln.rstrip().endswith("\\"):
            cur += ln.rstrip()[:-1] + " "
            continue
        cur += ln
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


# --- substitution (run mode) -------------------------------------------------------------
MODEL_WORD = re.compile(r"(?<=[ \t])(PATH|BASE|MODEL)(?=[ \t;)]|$)", re.M)


def substitute(text: str, root: Path, model: Path | None = None) -> str:
    text = re.sub(r"(?<![\w./$-])\.venv/bin/", lambda _: f"{BIN}/", text)
    text = re.sub(r"(?<![\w./-])/tmp/(d|rs)(?![\w.-])", lambda m: f"{root}/{m[1]}", text)
    text = re.sub(r"(?<![\w./-])\.\./shared/", lambda _: f"{SHARED}/", text)
    text = re.sub(r"\bcd repskip(?![\w./-])", lambda _: f"cd {shlex.quote(str(REPO))}", text)
    if model is not None:
        text = MODEL_WORD.sub(lambda _: shlex.quote(str(model)), text)
    return text


def uses_model(text: str) -> bool:
    return bool(MODEL_WORD.search(text))


DATA_ARG = re.compile(r"--data[ =]\w+=(?P<data>[^\s;&|]+)|--calib[ =](?P<calib>[^\s;&|]+)")
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A layer that changes little can be skipped.\n\n"
    "Rivers run to the sea, and the sea is not full; to the place the rivers come from, they return.\n\n"
    "In the beginning the universe was created. This has made a lot of people very angry.\n"
)


def provide_data(script: str, root: Path) -> None:
    """Make the relative data files a command names and nobody made; skip when shared data
    the command names is not on this machine."""
    for m in DATA_ARG.finditer(script):
        name = (m["data"] or m["calib"]).strip("'\"")
        path = Path(name) if os.path.isabs(name) else root / name
        if path.exists():
            continue
        if path.is_relative_to(SHARED):
            pytest.skip(f"shared data {path} is not on this machine")
        if os.path.isabs(name):
            continue  # the command's own business: let it fail if the doc is wrong
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            import json

            path.write_text("".join(json.dumps({"text": p}) + "\n" for p in SAMPLE_TEXT.split("\n\n")))
        else:
            path.write_text(SAMPLE_TEXT * 40)  # a few ~2000-character perplexity items


# --- parse-only checks -------------------------------------------------------------------
class _Parsed(Exception):
    pass


def simple_commands(line: str) -> list[list[str]]:
    """``line`` split into simple commands (token lists) at ``&&``, ``||``, ``;``, ``|``, ``&``;
    ``NAME=$(CMD)`` gives CMD."""
    m = re.fullmatch(r"\s*\w+=\$\((.*)\)\s*", line)
    if m:
        return simple_commands(m[1])
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    cmds, cur = [], []
    for tok in lex:
        if tok and set(tok) <= set(";&|"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    out = []
    for cmd in cmds:
        while cmd and re.fullmatch(r"\w+=.*", cmd[0]):  # leading VAR=value assignments
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


def check_cli(args: list[str]) -> str | None:
    """Parse ``repskip ARGS`` with click; the error message, or None."""
    from repskip.cli import main

    ctx = click.Context(main, info_name="repskip")
    try:
        with ctx:
            if not args:
                return "no subcommand"
            name, cmd, rest = main.resolve_command(ctx, list(args))
            cmd.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit:
        pass  # --help / --version
    except click.ClickException as exc:
        return exc.format_message()
    return None


def _no_git(real):
    def run(args, *a, **kw):  # bench/_common asks git for the commit at import: not here
        if isinstance(args, (list, tuple)) and args and args[0] == "git":
            return subprocess.CompletedProcess(args, 1, "", "")
        return real(args, *a, **kw)

    return run


def check_bench(script: str, args: list[str]) -> str | None:
    """Parse ``python bench/X.py ARGS`` with the script's own argparse parser (imported as a
    module; its ``parse()``, or its ``main()`` stopped right after parsing)."""
    path = (REPO / script).resolve()
    if not path.is_file():
        return f"{script} does not exist"
    before, old_path = set(sys.modules), list(sys.path)
    real_parse = argparse.ArgumentParser.parse_args

    def parse_args(self, a=None, namespace=None):
        raise _Parsed(real_parse(self, a, namespace))

    err = io.StringIO()
    sys.path.insert(0, str(path.parent))
    try:
        with mock.patch.object(subprocess, "run", _no_git(subprocess.run)):
            spec = importlib.util.spec_from_file_location(f"_docs_bench_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        entry = getattr(module, "parse", None) or getattr(module, "main")
        with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args), \
                mock.patch.object(sys, "argv", [str(path), *args]), contextlib.redirect_stderr(err):
            entry()
        return f"{script}: its main() returned without parsing arguments"
    except _Parsed:
        return None
    except SystemExit as exc:
        if exc.code in (0, None):
            return None
        said = [ln for ln in err.getvalue().splitlines() if "error:" in ln] or [str(exc)]
        return f"{script} {shlex.join(args)}: {said[-1]}"
    finally:
        sys.path[:] = old_path  # the scripts add bench/ and tests/ themselves
        for name in set(sys.modules) - before:  # bench modules (_common) stay out of other tests
            mod_file = getattr(sys.modules[name], "__file__", None) or ""
            if name.startswith("_docs_bench_") or Path(mod_file).parent == path.parent:
                del sys.modules[name]


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for line in re.findall(r"^([\w./ -]+):(?!=)", text, re.M) for t in line.split()}


REPO_PATH = re.compile(r"^(recipes|bench|docs|tests|plugins)/")


def check_command(cmd: list[str]) -> tuple[str, str | None]:
    """("checked" or "unchecked", error or None) for one simple command."""
    prog = os.path.basename(cmd[0])
    for tok in cmd[1:]:  # files of the repository that the command names must exist
        tok = tok.split("=", 1)[-1]
        if REPO_PATH.match(tok) and not (REPO / tok).exists():
            return "checked", f"{tok} does not exist in the repository"
    if prog == "repskip":
        return "checked", check_cli(cmd[1:])
    if re.fullmatch(r"python(3(\.\d+)?)?", prog) and len(cmd) > 1:
        if cmd[1].endswith(".py"):
            return "checked", check_bench(cmd[1], cmd[2:])
        if cmd[1] == "-c" and len(cmd) > 2:
            try:
                compile(cmd[2], "<doc>", "exec")
            except SyntaxError as exc:
                return "checked", f"python -c: {exc}"
            return "checked", None
    if prog == "make":
        targets = [a for a in cmd[1:] if not a.startswith("-") and "=" not in a]
        missing = [t for t in targets if t not in _make_targets()]
        return "checked", (f"no target {missing} in the Makefile" if missing else None)
    return "unchecked", None


# --- tests -------------------------------------------------------------------------------
BLOCKS = all_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.shell]


def _python_starts(block: Block) -> int:
    n = 0
    for line in command_lines(block):
        for cmd in simple_commands(line):
            n += os.path.basename(cmd[0]) == "repskip" or bool(re.fullmatch(r"python[\d.]*", os.path.basename(cmd[0])))
    return n


def _run_docs():
    params = []
    for doc in DOCS:
        rel = doc.relative_to(REPO).as_posix()
        run = [b for b in SHELL_BLOCKS if b.doc == rel and b.mode == "run"]
        if not run:
            continue
        starts = sum(_python_starts(b) for b in run) + any(uses_model(b.text) for b in run)
        marks = [pytest.mark.slow] if starts > SLOW_AFTER else []
        params.append(pytest.param(rel, marks=marks, id=rel))
    return params


def test_blocks_are_found():
    docs = {b.doc for b in SHELL_BLOCKS}
    assert {"README.md", "docs/quickstart.md", "docs/diffusion.md"} <= docs, docs
    assert any(b.mode == "run" for b in SHELL_BLOCKS)


def test_directives_are_valid():
    problems = []
    for doc in DOCS:
        blocks, stray = parse_markdown(doc)
        rel = doc.relative_to(REPO).as_posix()
        problems += [f"{rel}:{n}: a docs-test comment must end on the line right before a fence" for n in stray]
        for b in blocks:
            if b.mode not in MODES:
                problems.append(f"{b.id}: unknown docs-test mode {b.mode!r} (one of {sorted(MODES)})")
            elif b.mode == "file" and (b.shell or not b.arg):
                problems.append(f"{b.id}: 'file PATH' goes before a non-shell block, with a path")
            elif b.mode != "file" and not b.shell:
                problems.append(f"{b.id}: a {b.mode!r} comment before a block that is not a shell block")
            elif b.mode in ("parse-only", "skip") and not b.arg:
                problems.append(f"{b.id}: say why the block is {b.mode}")
    assert not problems, "\n".join(problems)


def test_substitute():
    root, model = Path("/w"), Path("/m/llama")
    text = ('repskip analyze PATH -o /tmp/rs/x; echo "$PATH" PATH=1 PATHS\n'
            "cd repskip && .venv/bin/python -c \"Path('/tmp/d/llama')\" /tmp/dx ../shared/data\n"
            "repskip verify BASE exported/x\n")
    out = substitute(text, root, model)
    assert out.splitlines() == [
        'repskip analyze /m/llama -o /w/rs/x; echo "$PATH" PATH=1 PATHS',
        f"cd {REPO} && {BIN}/python -c \"Path('/w/d/llama')\" /tmp/dx {SHARED}/data",
        "repskip verify /m/llama exported/x",
    ]


@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS], ids=lambda b: b.id)
def test_block(block):
    """Every shell block parses (run blocks too, so the fast tier checks them); skip blocks skip."""
    if block.mode == "skip":
        pytest.skip(f"{block.id}: {block.arg}")
    checked, unchecked, errors = 0, [], []
    # scripts a `file` block of the same page writes: the page's run makes and runs them
    written = {Path(b.arg).name for b in BLOCKS if b.doc == block.doc and b.mode == "file"}
    for line in command_lines(block):
        for cmd in simple_commands(line):
            if re.fullmatch(r"python[\d.]*", os.path.basename(cmd[0])) and len(cmd) > 1 \
                    and Path(cmd[1]).name in written:
                unchecked.append(shlex.join(cmd))
                continue
            kind, error = check_command(cmd)
            if kind == "unchecked":
                unchecked.append(shlex.join(cmd))
                continue
            checked += 1
            if error:
                errors.append(f"{shlex.join(cmd)}\n    {error}")
    if unchecked:
        print(f"{block.id}: not checked: " + "; ".join(unchecked))
    assert not errors, f"{block.id} ({block.mode}):\n" + "\n".join(errors)
    if not checked:
        pytest.skip(f"{block.id}: nothing here can be checked: {'; '.join(unchecked)}")


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def run_blocks(blocks: list[Block], root: Path) -> list[str]:
    """Execute the run blocks of ``blocks`` (and write their file blocks) in order, in
    ``root``; fail at the first block that fails. The time each block took."""
    (root / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    env = {
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }
    model = None
    timings = []
    for block in blocks:
        if block.mode == "file":
            path = Path(substitute(block.arg, root))
            path = path if path.is_absolute() else root / path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text)
            continue
        if not block.shell or block.mode != "run":
            continue
        if model is None and uses_model(block.text):
            from helpers import make_checkpoint

            model = make_checkpoint(root / "llama", "llama")
        text = "\n".join(command_lines(block)) + "\n" if block.lang == "console" else block.text
        script = substitute(text, root, model)
        provide_data(script, root)
        t0 = time.monotonic()
        try:
            done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{block.id} ran past {BLOCK_TIMEOUT_S} s:\n{script}\n--- stderr ---\n"
                        f"{_tail(exc.stderr or '')}", pytrace=False)
        timings.append(f"{block.id}: {time.monotonic() - t0:.1f} s")
        if done.returncode != 0:
            pytest.fail(f"{block.id} failed (exit {done.returncode}):\n{script}\n--- stderr ---\n"
                        f"{_tail(done.stderr)}\n--- stdout ---\n{_tail(done.stdout, 2000)}", pytrace=False)
    return timings


@pytest.mark.parametrize("doc", _run_docs())
def test_doc_runs(doc, tmp_path):
    """The run blocks of one doc, executed in order in one working directory."""
    print("\n".join(run_blocks([b for b in BLOCKS if b.doc == doc], tmp_path)))
