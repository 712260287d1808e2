"""Progress off a terminal (plain lines at tenths and on a heartbeat), the status file, and
``analyze`` reusing a finished analysis of the same model and calibration."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from repskip.cli import main
from repskip.progress import Reporter

REPSKIP = Path(sys.executable).parent / "repskip"
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] test: ")


def plain_reporter(**kw) -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter("test", stream=out, plain=True, **kw), out


def test_plain_lines_come_at_every_tenth_with_rate_and_eta():
    reporter, out = plain_reporter(interval=3600)
    with reporter.stage("working", "items", total=200) as update:
        for done in range(1, 201):
            update(done, 200)
    lines = out.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines)
    assert "working 0/200 items (0%)" in lines[0]
    assert len(lines) == 1 + 10  # the start, then one line per tenth, none in between
    assert "working 20/200 items (10%)" in lines[1] and "items/s" in lines[1] and "ETA" in lines[1]
    assert "200/200 items (100%)" in lines[-1] and "done in" in lines[-1]


def test_a_slow_step_still_gets_a_line_every_interval():
    reporter, out = plain_reporter(interval=0.3)
    with reporter.stage("slow", "batches", total=1000) as update:
        update(1, 1000)
        time.sleep(1.5)  # no update for five intervals: the heartbeat speaks
    lines = [line for line in out.getvalue().splitlines() if "slow 1/1000 batches" in line]
    assert len(lines) >= 3, out.getvalue()
    assert "after" in out.getvalue().splitlines()[-1]  # a stage that ends early says so


def test_a_resumed_stage_counts_its_earlier_work_but_times_only_its_own(monkeypatch):
    """A heal resumed at step 60 of 100: the line says 60/100, and the rate and ETA come
    from the steps this run made, not from 60 steps done in no time."""
    clock = {"t": 1000.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["t"])
    reporter, out = plain_reporter(interval=3600)
    update, close = reporter.tracker("steps")
    update("training", 60, 100)  # the first update: the stage and its clock start here
    for done in range(61, 71):
        clock["t"] += 30.0  # 30 s a step
        update("training", done, 100)
    close()
    lines = out.getvalue().splitlines()
    assert "training 60/100 steps (60%)" in lines[0]
    line = next(line for line in lines if "training 70/100" in line)
    assert "30 s per step" in line and "ETA 0:15:00" in line, line


def test_the_status_file_follows_the_run(tmp_path):
    status = tmp_path / "status.json"
    reporter, _ = plain_reporter(interval=3600, status=status)
    reporter.say("loading")
    assert json.loads(status.read_text())["message"] == "loading"
    with reporter.stage("analysing", "sequences", total=4) as update:
        update(2, 4)
        record = json.loads(status.read_text())
        assert record["kind"] == "repskip.status" and record["schema_version"] == 1
        assert record["state"] == "running" and record["stage"] == {
            "name": "analysing", "done": 2, "total": 4, "unit": "sequences"}
        update(4, 4)
    reporter.finish()
    record = json.loads(status.read_text())
    assert record["state"] == "done" and [s["name"] for s in record["stages"]] == ["analysing"]
    assert not (tmp_path / "elsewhere").exists()
    Reporter("x", plain=True, stream=io.StringIO(), status=tmp_path / "elsewhere" / "s.json").say("hi")
    assert not (tmp_path / "elsewhere").exists()  # a status file never creates a folder


def test_verify_writes_its_status_file(tiny, tmp_path):
    out, text = tmp_path / "v", tmp_path / "text.txt"
    text.write_text("The cat sat on the mat and looked at the door for a while.\n\n" * 8)
    res = CliRunner().invoke(main, ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "perplexity",
                                    "--data", f"perplexity={text}", "-o", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "status.json").read_text())
    assert record["command"] == "verify" and record["state"] == "done"
    assert any("perplexity" in s["name"] for s in record["stages"])


# --- reusing an analysis ------------------------------------------------------------------------


def analyze(model, out, *extra):
    return CliRunner().invoke(main, ["analyze", str(model), "-o", str(out), "--num-samples", "4", "--max-length", "16",
                                     "--repair", "none", *map(str, extra)])


def test_analyze_reuses_a_finished_analysis_and_chooses_again(tiny, tmp_path):
    out = tmp_path / "run"
    first = analyze(tiny["llama"], out, "-k", "1")
    assert first.exit_code == 0, first.output
    before = json.loads((out / "analysis.json").read_text())
    assert json.loads((out / "status.json").read_text())["state"] == "done"

    again = analyze(tiny["llama"], out, "-k", "3", "--strategy", "angular-block")
    assert again.exit_code == 0, again.output
    assert "reusing the analysis" in again.stderr and "analysing" not in again.stderr
    assert json.loads((out / "analysis.json").read_text()) == before  # not measured again
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["selection"]["k"] == 3 and len(recipe["resolved"]["remove"]) == 3

    # other measurements: not reused, and the folder is not replaced without --force
    other = analyze(tiny["llama"], out, "-k", "1", "--batch-size", "2")
    assert other.exit_code == 1 and "cannot be reused (its batch size was 8, now 2)" in other.stderr
    assert "already exists; pass --force" in other.stderr
    other = analyze(tiny["llama"], out, "-k", "1", "--seed", "1")
    assert other.exit_code == 1 and "its calibration tokens differ" in other.stderr
    other = analyze(tiny["qwen2"], out, "-k", "1")
    assert other.exit_code == 1 and "another checkpoint" in other.stderr
    fresh = analyze(tiny["llama"], out, "-k", "1", "--no-reuse")
    assert fresh.exit_code == 1 and "already exists" in fresh.stderr
    assert json.loads((out / "analysis.json").read_text()) == before

    # a file of the user's in the folder: no reuse (it would replace the folder), nothing touched
    (out / "notes.txt").write_text("mine")
    mine = analyze(tiny["llama"], out, "-k", "2")
    assert mine.exit_code == 1 and "already exists; pass --force" in mine.stderr
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "analysis.json").read_text()) == before
    (out / "notes.txt").unlink()
    (out / ".repskip-output.json").unlink()  # no marker: not known to be repskip's
    assert analyze(tiny["llama"], out, "-k", "2").exit_code == 1 and (out / "analysis.json").is_file()


def test_a_loss_search_is_reused_only_when_it_answers_the_new_question(tiny, tmp_path):
    out = tmp_path / "run"
    res = analyze(tiny["llama"], out, "--strategy", "greedy-loss", "-k", "2", "--search-samples", "2")
    assert res.exit_code == 0, res.output
    shallower = analyze(tiny["llama"], out, "--strategy", "greedy-loss", "-k", "1", "--search-samples", "2")
    assert shallower.exit_code == 0 and "reusing the loss search" in shallower.stderr
    deeper = analyze(tiny["llama"], out, "--strategy", "greedy-loss", "-k", "3", "--search-samples", "2")
    assert deeper.exit_code == 0 and "reusing the loss search" not in deeper.stderr and "searching" in deeper.stderr
    protected = analyze(tiny["llama"], out, "--strategy", "greedy-loss", "-k", "1", "--search-samples", "2",
                        "--protect", "2")
    assert protected.exit_code == 0 and "reusing the loss search" not in protected.stderr
    # a repaired search recorded before its choices were checked as the final fit checks maps
    repaired = ["--strategy", "greedy-loss", "-k", "1", "--search-samples", "2", "--repair", "linear"]
    assert analyze(tiny["llama"], out, *repaired).exit_code == 0
    assert "reusing the loss search" in analyze(tiny["llama"], out, *repaired).stderr
    data = json.loads((out / "analysis.json").read_text())
    assert data["search"]["checked_choices"] is True
    del data["search"]["checked_choices"]
    (out / "analysis.json").write_text(json.dumps(data))
    older = analyze(tiny["llama"], out, *repaired)
    assert older.exit_code == 0 and "reusing the loss search" not in older.stderr and "searching" in older.stderr


@pytest.mark.slow
def test_analyze_on_smollm2_logs_progress_within_ten_seconds(tmp_path):
    """The must-hold of issue 12: ``repskip analyze ... > log 2>&1`` shows progress lines
    within 10 s on the real model."""
    from repskip.default_model import ensure_default_model

    model = ensure_default_model()
    log = tmp_path / "log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(REPSKIP), "analyze", str(model), "-o", str(tmp_path / "run")],
                                stdout=fh, stderr=subprocess.STDOUT)
    def wait_for(text: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and text not in log.read_text():
            time.sleep(0.2)
        return log.read_text()

    try:
        first = wait_for("analyze: opening", 10)  # the must-hold: a line in the log within 10 s
        later = wait_for("analysing 0/64 sequences", 60)  # then the stage, with its count
    finally:
        proc.kill()
        proc.wait()
    assert "analyze: opening" in first, first
    assert "analysing 0/64 sequences" in later and "loading SmolLM2-135M-Instruct" in later, later
