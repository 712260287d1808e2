"""A careless user cannot lose files through repskip, and bad input is answered before work
starts: --force replaces only what repskip wrote, never an input or a folder above it; a
killed run's debris is cleaned by the next; every bad input is one line, exit code 1, no
traceback and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import folder_snapshot, make_checkpoint
from repskip.cli import main
from repskip.outputs import MARKER

REPSKIP = Path(sys.executable).parent / "repskip"
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.txt"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message: str) -> None:
    """Exit code 1, no traceback, one ``error:`` line (the last) that holds ``message``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert message in errors[0], errors[0]


def analyze(model: Path, runs: Path) -> None:
    res = run("analyze", model, "-o", runs, "-k", "1", "--threshold", "-1", "--num-samples", "2", "--max-length", "8")
    assert res.exit_code == 0, res.output


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of a tiny checkpoint, with a sibling file, so that damage would show."""
    folder = tmp_path / "models" / "llama"
    shutil.copytree(tiny["llama"], folder)
    (tmp_path / "models" / "notes.txt").write_text("a sibling of the checkpoint")
    return folder


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nresolved: {remove: [1, 2]}\n")
    return path


# --- --force -----------------------------------------------------------------------------------
def test_force_never_touches_the_input_its_parents_or_its_contents(model, recipe, tmp_path):
    parent = folder_snapshot(model.parent)
    one_line_error(run("analyze", model, "-o", model, "--force", "--num-samples", "2", "--max-length", "8"),
                   "it is the input")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", model.parent, "--force"), "it holds the input")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", model, "--force"), "it is the input")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", model / "pruned"), "inside it")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", tmp_path, "--force"), "it holds the input")
    assert folder_snapshot(model.parent) == parent


def test_force_never_replaces_home_root_or_the_working_directory(model, recipe, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    one_line_error(run("compress", model, "--recipe", recipe, "-o", home, "--force"), "home folder")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", "/", "--force"), "file system root")
    made = tmp_path / "made"
    assert run("compress", model, "--recipe", recipe, "-o", made).exit_code == 0
    monkeypatch.chdir(made)
    one_line_error(run("compress", model, "--recipe", recipe, "-o", ".", "--force"), "working directory")
    assert (home / "thesis.tex").read_text() == "years of work" and (made / MARKER).is_file()


def test_force_replaces_only_a_folder_repskip_wrote(model, recipe, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "data.csv").write_text("1,2,3")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", users, "--force"), "repskip did not write")
    assert folder_snapshot(users) == {"data.csv": b"1,2,3"}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("compress", model, "--recipe", recipe, "-o", empty, "--force").exit_code == 0
    marker = json.loads((empty / MARKER).read_text())
    assert marker["kind"] == "repskip.output" and marker["command"] == "compress"
    assert run("compress", model, "--recipe", recipe, "-o", empty, "--force").exit_code == 0  # ours now

    link = tmp_path / "link"
    link.symlink_to(empty)
    one_line_error(run("compress", model, "--recipe", recipe, "-o", link, "--force"), "symbolic link")
    legacy = tmp_path / "legacy"  # written by a repskip from before the marker
    shutil.copytree(empty, legacy)
    (legacy / MARKER).unlink()
    assert run("compress", model, "--recipe", recipe, "-o", legacy, "--force").exit_code == 0


def test_select_force_replaces_only_a_recipe(model, tmp_path):
    runs = tmp_path / "runs"
    analyze(model, runs)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    one_line_error(run("select", runs / "analysis.json", "-o", notes, "-k", "1", "--threshold", "-1", "--force"),
                   "repskip did not write")
    one_line_error(run("select", runs / "analysis.json", "-o", runs / "analysis.json", "-k", "1", "--force"),
                   "it is the input")
    assert notes.read_text() == "mine"
    assert run("select", runs, "-o", runs / "recipe.yaml", "-k", "2", "--force", "--threshold", "-1").exit_code == 0
    assert len(yaml.safe_load((runs / "recipe.yaml").read_text())["resolved"]["remove"]) == 2


# --- debris of killed runs -------------------------------------------------------------------------
SLOW = """
import sys, time
import repskip.{module} as m
real = m.{function}
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    print("written", flush=True)
    time.sleep(120)
    return out
m.{function} = slow
from repskip.cli import main
main(sys.argv[1:])
"""


def _start_slow(module: str, function: str, *args) -> subprocess.Popen:
    """The CLI with ``module.function`` stalling after it ran: a run caught midway."""
    code = SLOW.format(module=module, function=function)
    # SIGHUP and SIGINT as a terminal would leave them, even when the tests themselves run under
    # nohup (the CLI keeps an ignored SIGHUP ignored, by design) or as a background job of a
    # script (which starts with SIGINT ignored, and Python then never turns it into Ctrl-C)
    def terminal_signals() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=terminal_signals)
    assert proc.stdout.readline().strip() == "written", proc.stderr.read()
    return proc


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def test_a_compress_killed_midway_leaves_debris_the_next_run_removes(model, recipe, tmp_path):
    out = tmp_path / "exported" / "m"
    proc = _start_slow("compress.files", "_write_shard", "compress", model, "--recipe", recipe, "-o", out,
                       "--max-shard-size", "20KB")
    proc.kill()
    proc.wait()
    assert debris(out.parent) == [f".m.partial-{proc.pid}"] and not out.exists()
    assert run("compress", model, "--recipe", recipe, "-o", out).exit_code == 0
    assert debris(out.parent) == [] and (out / "model.safetensors").is_file()


def test_an_onnx_export_killed_midway_is_cleaned_by_the_next_run(model, recipe, tmp_path):
    out = tmp_path / "exported" / "m-onnx"
    proc = _start_slow("compress.onnx_export", "_export", "compress", model, "--recipe", recipe, "-o", out,
                       "--format", "onnx")
    proc.kill()
    proc.wait()
    assert debris(out.parent) == [f".m-onnx.partial-{proc.pid}"]
    assert run("compress", model, "--recipe", recipe, "-o", out).exit_code == 0
    assert debris(out.parent) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_terminated_runs_remove_their_own_partial_output(model, recipe, tmp_path, sig):
    out = tmp_path / "exported" / "m"
    proc = _start_slow("compress.files", "_write_shard", "compress", model, "--recipe", recipe, "-o", out,
                       "--max-shard-size", "20KB")
    proc.send_signal(sig)
    assert proc.wait(timeout=30) in (143, 130)
    assert "nothing half-written" in proc.stderr.read()
    assert debris(out.parent) == [] and not out.exists()


def test_debris_that_is_not_stale_or_not_ours_stays(model, recipe, tmp_path):
    out = tmp_path / "exported" / "m"
    out.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out.parent / f".m.partial-{sleeper.pid}"  # a run still going
        live.mkdir()
        (live / ".repskip-partial.json").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        foreign = out.parent / ".m.partial-1"  # someone else's folder that only looks like ours
        foreign.mkdir()
        (foreign / "keep.txt").write_text("not repskip's")
        assert run("compress", model, "--recipe", recipe, "-o", out).exit_code == 0
        assert live.is_dir() and (foreign / "keep.txt").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_swap_cut_short_puts_the_previous_output_back(model, recipe, tmp_path):
    out = tmp_path / "exported" / "m"
    assert run("compress", model, "--recipe", recipe, "-o", out).exit_code == 0
    before = folder_snapshot(out)
    aside = out.parent / ".m.replaced-999999999"  # killed after moving the old output aside
    out.rename(aside)
    (aside / ".repskip-partial.json").write_text(json.dumps({"pid": 999999999, "host": os.uname().nodename}))
    assert run("compress", model, "--recipe", recipe, "-o", tmp_path / "exported" / "other").exit_code == 0
    assert aside.exists()  # another output's run leaves it alone
    one_line_error(run("compress", model, "--recipe", recipe, "-o", out), "already exists")
    assert folder_snapshot(out) == before and not aside.exists()


# --- bad input: one line, exit 1, nothing written ----------------------------------------------------
def test_bad_options_and_paths(model, recipe, tmp_path):
    runs = tmp_path / "runs"
    analyze(model, runs)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for value in ("5", "nan", "-inf"):
        one_line_error(run("analyze", model, "-o", tmp_path / "a", "--threshold", value), "--threshold is a cosine")
        one_line_error(run("select", runs / "analysis.json", "-o", tmp_path / "s.yaml", "--threshold", value),
                       "--threshold is a cosine")
    for command in (["analyze", model, "-o", tmp_path / "a"], ["generate", model, "--prompt", "x"],
                    ["verify", model, model, "--bench", "perplexity", "-o", tmp_path / "v"]):
        one_line_error(run(*command, "--device", "banana"), "unknown device 'banana'")
    (tmp_path / "folder").mkdir()
    one_line_error(run("select", runs / "analysis.json", "-o", tmp_path / "folder"), "is a folder")
    one_line_error(run("compress", model, "--recipe", recipe, "-o", a_file / "out"), "is a file, not a folder")
    text = tmp_path / "text.txt"
    text.write_text("Some text to score.\n\n" * 300)
    one_line_error(run("verify", model, model, "--bench", "perplexity", "--data", f"perplexity={text}", "-o", a_file),
                   "is a file")
    one_line_error(run("verify", model, model, "--bench", "gsm8k", "--data", "gsm8k=/nonexistent/test.jsonl",
                       "-o", tmp_path / "v"), "--data gsm8k=/nonexistent/test.jsonl: no such file")
    assert not any((tmp_path / name).exists() for name in ("a", "s.yaml", "v"))
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("body, message", [
    ("resolved: {remove: [true]}", "resolved.remove.0"),
    ("resolved: {remove: ['2']}", "resolved.remove.0"),
    ("resolved: {remove: []}", "resolved.remove"),
    ("selection: {strategy: paper, k: '2'}", "selection.k"),
])
def test_recipe_values_are_never_coerced(model, tmp_path, body, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"schema_version: 1\n{body}\n")
    one_line_error(run("compress", model, "--recipe", path, "-o", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_a_recipe_that_is_not_utf8_text(model, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"schema_version: 1\nname: \xff\xfe\x00\x81\n")
    one_line_error(run("compress", model, "--recipe", path, "-o", tmp_path / "out"), "not UTF-8")


@pytest.mark.parametrize("k, extra, message", [
    (6, [], "k=6 would remove every layer"),
    (3, [], "at most 2 of the 6 layers"),  # paper: no two adjacent among layers 1-4
    (5, ["strategy: angular-block"], "no block of 5 contiguous layers"),
])
def test_an_unresolved_recipe_that_cannot_be_met_is_refused_before_the_analysis(model, tmp_path, k, extra, message):
    path = tmp_path / "r.yaml"
    strategy = extra[0] if extra else "strategy: paper"
    path.write_text(f"schema_version: 1\nselection: {{{strategy}, k: {k}}}\n")
    start = time.monotonic()
    res = run("compress", model, "--recipe", path, "-o", tmp_path / "out")
    one_line_error(res, message)
    assert "analysing" not in res.output and time.monotonic() - start < 10


@pytest.mark.parametrize("damage, message", [
    (lambda d: {k: v for k, v in d.items() if k != "groups"}, "no 'groups' section"),
    (lambda d: {**d, "groups": {g: {**v, "layers": v["layers"][:3]} for g, v in d["groups"].items()}},
     "does not hold 6 layers"),
    (lambda d: {**d, "model": {**d["model"], "num_layers": "six"}}, "model.num_layers"),
    (lambda d: [d], "not a repskip analysis file"),
])
def test_select_on_an_incomplete_analysis(model, tmp_path, damage, message):
    runs = tmp_path / "runs"
    analyze(model, runs)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(damage(json.loads((runs / "analysis.json").read_text()))))
    one_line_error(run("select", broken, "-o", tmp_path / "r.yaml", "--strategy", "angular-block", "-k", "2"), message)
    assert not (tmp_path / "r.yaml").exists()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    one_line_error(run("select", broken, "-o", tmp_path / "r.yaml"), "is not a JSON analysis")


# --- a full disk -----------------------------------------------------------------------------------
def _on_a_full_disk(tmp_path: Path, script: str) -> str:
    """Run ``script`` (sh) with $D a tiny tmpfs filled but for ``$FREE`` bytes, in a private
    mount namespace; return its output. Skips where user namespaces are unavailable."""
    disk = tmp_path / "disk"
    disk.mkdir()
    full = (f'exec 2>&1; mount -t tmpfs -o size=64k tmpfs "{disk}" || exit 97\n'
            f'D="{disk}"; head -c 1000000 /dev/zero > "$D/filler" 2>/dev/null\n' + script)
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux unshare")
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", full],
                          capture_output=True, text=True, timeout=600)
    if done.returncode == 97:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    return done.stdout + done.stderr


def test_select_on_a_full_disk_writes_nothing_and_the_rerun_works(model, tmp_path):
    runs = tmp_path / "runs"
    analyze(model, runs)
    out = _on_a_full_disk(tmp_path, f'''
"{REPSKIP}" select "{runs}/analysis.json" -o "$D/recipe.yaml" -k 1 --threshold -1; echo "rc=$?"; ls -A "$D"
rm "$D/filler"; "{REPSKIP}" select "{runs}/analysis.json" -o "$D/recipe.yaml" -k 1 --threshold -1 >/dev/null; echo "rc=$?"; ls -A "$D"
''')
    lines = out.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], out
    assert "Traceback" not in out
    assert lines[lines.index("rc=1") + 1:lines.index("rc=1") + 2] == ["filler"], out  # no 0-byte recipe, no debris
    assert lines[-2:] == ["rc=0", "recipe.yaml"], out


@pytest.mark.skipif(not WIKI.is_file(), reason="needs ../shared/data")
def test_verify_on_a_full_disk_is_one_line(model, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text(WIKI.read_text()[:6000])
    out = _on_a_full_disk(tmp_path, f'''
"{REPSKIP}" verify "{model}" "{model}" --bench perplexity --data perplexity="{text}" -o "$D/v"; echo "rc=$?"
find "$D" -name "*.partial-*" -o -name report.json
''')
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], out
    assert "Traceback" not in out and out.strip().endswith("rc=1"), out


# --- the verify cache ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verified_once(tiny, tmp_path_factory):
    """One finished perplexity verify run: (text file, its output folder, its report)."""
    root = tmp_path_factory.mktemp("verified")
    text = root / "wiki.txt"
    text.write_text(WIKI.read_text()[:8000] if WIKI.is_file() else "Some text to score.\n\n" * 300)
    out = root / "v"
    res = run("verify", tiny["llama"], tiny["llama"], "--bench", "perplexity", "--data", f"perplexity={text}", "-o", out)
    assert res.exit_code == 0, res.output
    return text, out, json.loads((out / "report.json").read_text())


@pytest.fixture
def verified(verified_once, tiny, tmp_path):
    """A private copy of that run: (the command that resumes it, its folder, its report)."""
    text, out, report = verified_once
    mine = tmp_path / "v"
    shutil.copytree(out, mine)
    return ["verify", tiny["llama"], tiny["llama"], "--bench", "perplexity", "--data", f"perplexity={text}",
            "-o", mine], mine, report


def _caches(out: Path) -> list[Path]:
    return sorted(out.glob("cache/*/*.jsonl"))


def test_a_torn_cache_line_is_recomputed_once_and_the_cache_rewritten(verified):
    command, out, report = verified
    cache = _caches(out)[0]
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    res = run(*command)
    assert res.exit_code == 0, res.output
    assert "cut short by an interrupted run" in res.stderr
    ids = [json.loads(line)["id"] for line in cache.read_text().splitlines()]
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in lines)  # each item once, none lost
    scores = lambda r: {k: v for k, v in r["benchmarks"]["perplexity"].items() if k != "throughput"}  # noqa: E731
    assert scores(json.loads((out / "report.json").read_text())) == scores(report)
    again = run(*command)
    assert again.exit_code == 0 and "cut short" not in again.stderr


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02binary\xff", "binary data"),
    (b'{"id": "x", "metrics": {"nll": 1.0}}\n[1, 2]\n', "line 2 is not a verify record"),
    (b'{"id": 5, "metrics": {}}\n', "no string 'id'"),
    (b'{"id": "a", "metrics": {"nll": "high"}}\n', "not a mapping of numbers"),
])
def test_a_cache_that_is_not_a_cache_is_one_line(verified, content, message):
    command, out, _ = verified
    cache = _caches(out)[0]
    cache.write_bytes(content)
    one_line_error(run(*command), message)
    assert cache.read_bytes() == content  # left for the user to look at


def test_an_output_folder_of_someone_elses_files_is_refused(model, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.json").write_text("my own report")
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.\n\n" * 20)
    one_line_error(run("verify", model, model, "--bench", "perplexity", "--data", f"perplexity={text}", "-o", theirs),
                   "repskip did not write")
    assert (theirs / "report.json").read_text() == "my own report"
    assert sorted(p.name for p in theirs.iterdir()) == ["report.json"]  # no status file written into it


def test_verifying_unrelated_models_warns(model, recipe, tmp_path):
    other = make_checkpoint(tmp_path / "other", "llama", seed=11)
    for compressed in (other, tmp_path / "other-skip2"):
        if compressed != other:
            assert run("compress", other, "--recipe", recipe, "-o", compressed).exit_code == 0
        text = tmp_path / "t.txt"
        text.write_text("Some text to score, long enough to make a few tokens.\n\n" * 20)
        res = run("verify", model, compressed, "--bench", "perplexity", "--data", f"perplexity={text}",
                  "-o", tmp_path / f"v-{compressed.name}")
        assert res.exit_code == 0, res.output
        said = " ".join(res.stderr.split())
        wanted = "carries no repskip-recipe.yaml" if compressed == other else "made from another model"
        assert wanted in said, said
    own = tmp_path / "own-skip2"
    assert run("compress", model, "--recipe", recipe, "-o", own).exit_code == 0
    res = run("verify", model, own, "--bench", "perplexity", "--data", f"perplexity={text}", "-o", tmp_path / "v-own")
    assert res.exit_code == 0 and "warning" not in res.stderr


# --- generation stays within the context -----------------------------------------------------------
def test_generate_caps_new_tokens_at_the_context(tmp_path):
    short = make_checkpoint(tmp_path / "short", "llama", max_position_embeddings=48)
    res = run("generate", short, "--prompt", "hello", "--max-new-tokens", "100000", "--no-chat")
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    assert "max_new_tokens 100000 capped at 43" in said and "context (48 tokens)" in said
    one_line_error(run("generate", short, "--prompt", "x" * 60, "--no-chat"), "fills the model's context (48 tokens)")


def test_a_benchmark_prompt_longer_than_the_context_is_refused_without_tokenizing_it_whole(model, tmp_path):
    data = tmp_path / "test.jsonl"
    huge = "How many apples? " * 2_000_000  # 34 MB of question
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4 #### 4"}) + "\n"
                    + json.dumps({"question": huge, "answer": "1 #### 1"}) + "\n")
    start = time.monotonic()
    res = run("verify", model, model, "--bench", "gsm8k", "--data", f"gsm8k={data}", "--bench-option", "gsm8k.shots=0",
              "--set", "max_new_tokens=4", "-o", tmp_path / "v")
    one_line_error(res, "item gsm8k/test/1: its prompt fills the model's context (4096 tokens)")
    assert time.monotonic() - start < 60 and not (tmp_path / "v" / "report.json").exists()


def test_a_verify_run_from_before_the_marker_still_resumes(verified):
    command, out, report = verified
    (out / MARKER).unlink()
    (out / "status.json").unlink()  # an older repskip wrote neither
    (out / "report.json").unlink()  # interrupted before its report, by an older repskip
    res = run(*command)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["benchmarks"]["perplexity"]["base"] == \
        report["benchmarks"]["perplexity"]["base"]
