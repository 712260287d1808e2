"""verify: same items and settings for both models, exact self-retention, resumable runs
that never recompute an item, a retention gate, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import fake_install, make_checkpoint
from repskip import registry
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.verify.run import verify

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "repskip-example"
ARC = REPO.parent / "shared" / "data" / "arc" / "ARC-Easy-Test.jsonl"
WIKI = REPO.parent / "shared" / "data" / "wikitext2" / "test.txt"

pytestmark = pytest.mark.skipif(not ARC.is_file(), reason="needs ../shared/data")


@pytest.fixture(autouse=True)
def arc_plugin(tmp_path_factory, monkeypatch):
    site = fake_install(tmp_path_factory.mktemp("site"), "repskip-example", "0.1.0",
                        {"repskip.benchmarks": {"arc-easy": "repskip_example.benchmark:ARCEasy"}})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.refresh()
    yield
    registry.refresh()


@pytest.fixture
def wiki_small(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI.read_text()[:20000])
    return path


def scores(report):
    return {name: {k: e[k] for k in ("items", "base", "compressed", "retention", "retention_ci95", "p_value")}
            for name, e in report["benchmarks"].items()}


def test_a_model_against_itself_retains_exactly_everything(tiny, tmp_path, wiki_small):
    report = verify(tiny["llama"], tiny["llama"], benches=["arc-easy", "perplexity"],
                    data={"arc-easy": str(ARC), "perplexity": str(wiki_small)}, limit=4, output=tmp_path / "v",
                    overrides={"max_new_tokens": 4}, batch_size=2)
    for name, entry in report["benchmarks"].items():
        assert entry["retention"] == 1.0, name
        assert entry["p_value"] == 1.0
    assert report["benchmarks"]["perplexity"]["base"] > 1.0
    saved = json.loads((tmp_path / "v" / "report.json").read_text())
    assert saved["schema_version"] == 2 and saved["kind"] == "repskip.verify"
    assert "| arc-easy | 4 |" in (tmp_path / "v" / "report.md").read_text()


def test_recipe_in_memory_reports_flops_speed_and_settings(tiny, tmp_path, wiki_small):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [2, 3]}\n")
    report = verify(tiny["qwen2"], recipe=recipe, benches=["arc-easy", "perplexity"],
                    data={"arc-easy": str(ARC), "perplexity": str(wiki_small)}, limit=3, output=tmp_path / "v",
                    overrides={"max_new_tokens": 3})
    arc = report["benchmarks"]["arc-easy"]
    assert report["compressed"]["layers"] == 4 and report["compressed"]["removed"] == [2, 3]
    assert arc["flops"]["layer_fraction"] == pytest.approx(2 / 6)
    assert 0 < arc["flops"]["reduction"] < 2 / 6  # embeddings and LM head are not removed
    assert arc["settings"]["max_new_tokens"] == 3 and arc["settings"]["temperature"] == 0.0
    assert arc["throughput"]["base"]["tokens_per_s"] > 0
    ppl = report["benchmarks"]["perplexity"]
    assert ppl["metric"] == "perplexity" and ppl["base"] != ppl["compressed"]
    assert ppl["retention"] == pytest.approx(ppl["base"] / ppl["compressed"])
    assert report["settings"]["seed"] == 0 and report["versions"]["torch"]
    sp = report["speed"]  # timed, so only its shape and the FLOPs ideal are exact
    assert sp["prompt_from"].startswith("arc-easy/") and sp["new_tokens"] == 32 and sp["repeats"] == 5
    assert set(sp["speedup"]) == {"prefill", "decode", "generation"}
    assert all(r["min"] <= r["median"] <= r["max"] for r in sp["speedup"].values())
    assert 1 < sp["flops_ideal"]["decode"] < 6 / 4 and 1 < sp["flops_ideal"]["generation"] < 6 / 4
    assert sp["base"]["decode_ms_per_token"] > 0 and sp["compressed"]["tokens_per_s"] > 0


def test_an_interrupted_run_resumes_to_the_same_report_without_recomputing(tiny, tmp_path, wiki_small):
    kwargs = dict(recipe=None, benches=["arc-easy", "perplexity"], limit=6, batch_size=2,
                  data={"arc-easy": str(ARC), "perplexity": str(wiki_small)}, overrides={"max_new_tokens": 4})
    compressed = tmp_path / "c"
    from repskip.pipeline import compress
    from repskip.recipe import Recipe, Resolved

    compress(tiny["llama"], Recipe(resolved=Resolved(remove=[1])), compressed)
    whole = verify(tiny["llama"], compressed, output=tmp_path / "whole", **kwargs)

    seen = []

    def stop_midway(label, done, total):
        seen.append(label)
        if label == "arc-easy compressed" and done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify(tiny["llama"], compressed, output=tmp_path / "resumed", progress=stop_midway, **kwargs)
    cached = list((tmp_path / "resumed" / "cache").rglob("arc-easy-*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in cached) == 6 + 2  # base done, 2 of compressed
    resumed_progress = []
    resumed = verify(tiny["llama"], compressed, output=tmp_path / "resumed",
                     progress=lambda label, done, total: resumed_progress.append((label, done)), **kwargs)
    assert scores(resumed) == scores(whole)
    assert resumed_progress[0] == ("arc-easy base", 6)  # nothing left to do for the base model
    for path in (tmp_path / "resumed" / "cache").rglob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert len(ids) == len(set(ids)), f"{path.name} computed an item twice"


def test_perplexity_scores_at_most_max_length_tokens_and_never_past_the_context(tiny, tmp_path, wiki_small):
    def tokens_scored(folder):
        records = [json.loads(line) for p in (folder / "cache").rglob("*.jsonl") for line in p.read_text().splitlines()]
        return [r["metrics"]["tokens"] for r in records]

    args = ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "perplexity", "--data",
            f"perplexity={wiki_small}", "--limit", "3", "--speed-repeats", "0"]
    res = CliRunner().invoke(main, [*args, "--max-length", "12", "-o", str(tmp_path / "short")])
    assert res.exit_code == 0, res.output
    assert set(tokens_scored(tmp_path / "short")) == {11}  # 12 tokens: 11 predicted
    report = json.loads((tmp_path / "short" / "report.json").read_text())
    assert report["settings"]["max_length"] == 12
    # a model whose context is 20 tokens is scored on 20, whatever --max-length asks
    short_context = make_checkpoint(tmp_path / "ctx20", "llama", seed=2, max_position_embeddings=20)
    args[1:3] = [str(short_context), str(short_context)]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "ctx")])
    assert res.exit_code == 0, res.output
    assert set(tokens_scored(tmp_path / "ctx")) == {19}


def test_gate_exit_codes(tiny, tmp_path, wiki_small):
    args = ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "perplexity",
            "--data", f"perplexity={wiki_small}", "--limit", "2", "-o", str(tmp_path / "v")]
    assert CliRunner().invoke(main, [*args, "--min-retention", "1.0"]).exit_code == 0
    failed = CliRunner().invoke(main, [*args, "--min-retention", "2.0"])
    assert failed.exit_code == 1 and "retention below 2.0 on: perplexity" in failed.stderr


def one_line_error(args, message):
    res = CliRunner().invoke(main, ["verify", *map(str, args)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_bad_input(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error([tiny["llama"], tiny["llama"], "--bench", "nonsense"], "unknown benchmark 'nonsense'; installed benchmarks:")
    one_line_error([tiny["llama"], tiny["llama"], "--bench", "arc-easy", "--data", f"arc-easy={empty}"], "holds no items")
    one_line_error([tiny["llama"], tiny["llama"], "--bench", "arc-easy", "--data", f"arc-easy={ARC}", "--limit", "99999"],
                   "--limit 99999 is larger than arc-easy's 2376 items")
    one_line_error([tiny["llama"], "--bench", "arc-easy"], "give a compressed model or --recipe")
    other = make_checkpoint(tmp_path / "other", "llama")
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zz-extra"] = len(vocab["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    one_line_error([tiny["llama"], other, "--bench", "arc-easy", "--data", f"arc-easy={ARC}", "--limit", "1"],
                   "different tokenizers")
    one_line_error([tiny["llama"], tiny["llama"], "--bench", "perplexity"], "perplexity needs a text file")


def test_two_processes_shard_the_items_and_merge_to_the_single_process_report(tiny, tmp_path, wiki_small):
    """What torchrun / accelerate launch do: RANK, WORLD_SIZE and a rendezvous address."""
    import os
    import socket
    import subprocess
    import sys

    site = tmp_path / "site"
    fake_install(site, "repskip-example", "0.1.0", {"repskip.benchmarks": {"arc-easy": "repskip_example.benchmark:ARCEasy"}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [2]}\n")
    args = ["verify", str(tiny["llama"]), "--recipe", str(recipe), "--bench", "arc-easy,perplexity",
            "--data", f"arc-easy={ARC}", "--data", f"perplexity={wiki_small}", "--limit", "5", "--batch-size", "2",
            "--set", "max_new_tokens=3"]
    single = verify(tiny["llama"], recipe=recipe, benches=["arc-easy", "perplexity"], limit=5, batch_size=2,
                    data={"arc-easy": str(ARC), "perplexity": str(wiki_small)}, overrides={"max_new_tokens": 3},
                    output=tmp_path / "single")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join([str(site), str(EXAMPLE)])
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": path, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "repskip", *args, "-o", str(tmp_path / "multi")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    merged = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert merged["settings"]["processes"] == 2
    assert scores(merged) == scores(single)
    rank_files = list((tmp_path / "multi" / "cache").rglob("arc-easy-*.rank*.jsonl"))
    assert len(rank_files) == 4  # 2 ranks x 2 models
    for model_dir in {p.parent for p in rank_files}:  # per model: every item once, by one rank
        ids = [json.loads(line)["id"] for p in rank_files if p.parent == model_dir for line in p.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 5


def test_device_map_spreads_hf_models_and_is_refused_where_unsupported(tiny, tmp_path, wiki_small):
    report = verify(tiny["llama"], tiny["llama"], benches=["perplexity"], data={"perplexity": str(wiki_small)},
                    limit=2, output=tmp_path / "v", device_map="auto")
    assert report["settings"]["device_map"] == "auto" and report["benchmarks"]["perplexity"]["retention"] == 1.0
    from helpers import llada_from_llama

    llada = llada_from_llama(make_checkpoint(tmp_path / "l", "llama", tie_word_embeddings=False), tmp_path / "d")
    with pytest.raises(RepskipError, match="loads onto one device"):
        verify(llada, llada, benches=["perplexity"], data={"perplexity": str(wiki_small)}, limit=1,
               output=tmp_path / "w", device_map="auto")


def test_a_model_spread_over_memory_and_an_offload_folder_scores_every_item_as_in_memory(tiny, tmp_path, wiki_small):
    """accelerate's big-model inference: with 600 kB allowed on the CPU (the tiny Llama's
    weights take 1.2 MB) the layers that do not fit wait in the offload folder and are loaded
    for each forward; every item's score is the in-memory one."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [2, 3]}\n")
    args = dict(recipe=recipe, benches=["perplexity", "arc-easy"],
                data={"perplexity": str(wiki_small), "arc-easy": str(ARC)}, limit=3, speed_repeats=0)
    whole = verify(tiny["llama"], output=tmp_path / "whole", **args)
    seen = {}
    load = AutoModelForCausalLM.from_pretrained.__func__

    def spying(cls, *a, **k):
        model = load(cls, *a, **k)
        seen.setdefault("maps", []).append(dict(getattr(model, "hf_device_map", {})))
        seen.setdefault("files", []).append(sorted(p.name for p in folder.iterdir()))
        return model

    from unittest import mock

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", classmethod(spying)):
        spread = verify(tiny["llama"], output=tmp_path / "spread", device_map="auto", max_memory=600_000,
                        offload_folder=folder, **args)
    assert any("disk" in m.values() for m in seen["maps"]), seen["maps"]  # it did not fit: some layers on disk
    assert all(any(f.startswith("repskip-offload-") for f in files) for files in seen["files"])
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]  # the fresh folder is gone, the user's file kept
    assert scores(spread) == scores(whole)
    for bench in ("perplexity", "arc-easy"):
        cached = [sorted((tmp_path / run / "cache").rglob(f"{bench}-*.jsonl")) for run in ("whole", "spread")]
        per_item = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                     for p in files for line in p.read_text().splitlines()] for files in cached]
        assert per_item[0] == per_item[1] and per_item[0]
    assert spread["settings"]["max_memory"] == 600_000


def test_benchmark_options_reach_the_benchmark(tiny, tmp_path, wiki_small):
    res = CliRunner().invoke(main, ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "perplexity",
                                    "--data", f"perplexity={wiki_small}", "--bench-option", "perplexity.chunk_chars=500",
                                    "--limit", "2", "-o", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(main, ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "perplexity",
                                    "--data", f"perplexity={wiki_small}", "--bench-option", "perplexity.colour=red"])
    assert bad.exit_code == 1 and "no option 'colour'" in bad.stderr


def test_a_killed_run_restarts_to_the_same_report(tiny, tmp_path, wiki_small):
    """SIGKILL the verify process once some items are cached, start it again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    site = tmp_path / "site"
    fake_install(site, "repskip-example", "0.1.0", {"repskip.benchmarks": {"arc-easy": "repskip_example.benchmark:ARCEasy"}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE)])}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1]}\n")
    args = [sys.executable, "-m", "repskip", "verify", str(tiny["llama"]), "--recipe", str(recipe), "--bench",
            "arc-easy", "--data", f"arc-easy={ARC}", "--limit", "40", "--batch-size", "1", "--set", "max_new_tokens=24"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    cached = lambda: sum(len(p.read_text().splitlines()) for p in out.rglob("*.jsonl")) if out.exists() else 0  # noqa: E731
    while cached() < 45 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = cached()
    assert 40 < before < 80, "the kill should land while the compressed model is being evaluated"
    assert not (out / "report.json").exists()
    done = subprocess.run([*args, "-o", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    whole = subprocess.run([*args, "-o", str(tmp_path / "whole")], env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    resumed = json.loads((out / "report.json").read_text())
    assert scores(resumed) == scores(json.loads((tmp_path / "whole" / "report.json").read_text()))
    for path in out.rglob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 40, f"{path.name}: an item computed twice or lost"


def test_generation_reports_its_prompt_and_flags_answers_cut_by_the_cap(tiny, tmp_path):
    """A random model never reaches a stop string: with a 3-token cap every answer is cut,
    which verify must say (in the report, report.md and on the terminal) with the prompt that ran."""
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i} #### {2 * i}"})
                            + "\n" for i in range(4)))
    out = tmp_path / "v"
    res = CliRunner().invoke(main, ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "gsm8k",
                                    "--data", f"gsm8k={data}", "--bench-option", "gsm8k.shots=0",
                                    "--set", "max_new_tokens=3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "report.json").read_text())["benchmarks"]["gsm8k"]
    assert entry["cut_by_cap"] == {"cap": 3, "base": 4, "compressed": 4, "too_many": True}
    assert entry["prompt_variant"].startswith("zero-shot chain of thought")  # the tiny tokenizer has a template
    said = " ".join(res.stdout.split())
    assert "ran into the 3-token cap" in said and "gsm8k: zero-shot chain of thought" in said
    assert "ran into the 3-token cap" in (out / "report.md").read_text()
    assert entry["uninformative"]  # a random model gets nothing right


def test_answers_left_empty_are_counted_and_flagged_when_the_compressed_model_has_many_more(tiny, tmp_path):
    """A model that closes the code block it was opened with and stops scores 0 on the item,
    which the score alone does not tell apart from a wrong answer: verify counts empty answers
    (whitespace or a fence only) for each model and says so when the compressed one has many more."""
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i} #### {2 * i}"})
                            + "\n" for i in range(4)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [2]}\n")
    out = tmp_path / "v"
    args = ["verify", str(tiny["llama"]), "--recipe", str(recipe), "--bench", "gsm8k", "--data", f"gsm8k={data}",
            "--bench-option", "gsm8k.shots=0", "--set", "max_new_tokens=3", "--speed-repeats", "0", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "report.json").read_text())["benchmarks"]["gsm8k"]
    assert entry["empty_answers"] == {"base": 0, "compressed": 0, "too_many": False}  # 3 random tokens say something
    assert "are empty" not in res.stdout

    # the answers, as runs of a model that stops at once would have left them: all of the
    # compressed model's, one of the base's
    def rewrite(path, texts):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "completion": t if t is not None else r["completion"]}) + "\n"
                                for r, t in zip(records, texts)))

    files = list(out.rglob("gsm8k*.jsonl"))
    assert len(files) == 2, files
    (comp,), (base,) = [p for p in files if "skip2" in str(p)], [p for p in files if "skip2" not in str(p)]
    rewrite(comp, ["```", "", " \n", "```python\n```"])
    rewrite(base, ["```", None, None, None])
    res = CliRunner().invoke(main, args)  # every item is cached: the report is made again from the records
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "report.json").read_text())["benchmarks"]["gsm8k"]
    assert entry["empty_answers"] == {"base": 1, "compressed": 4, "too_many": True}
    said = " ".join(res.stdout.split())
    assert "4 of the compressed model's 4 answers are empty" in said and "against 1 of the base's" in said
    assert "4 of the compressed model's 4 answers are empty" in (out / "report.md").read_text()


def test_empty_answers_are_flagged_only_when_the_compressed_model_has_a_tenth_of_the_items_more(tmp_path):
    from repskip.verify.cache import ItemCache
    from repskip.verify.report import empty_answers

    def cache(name, empty):
        c = ItemCache(tmp_path / name, "humaneval")
        c.add([{"id": str(i), "completion": "```" if i < empty else "    return x\n", "metrics": {"pass@1": 0.0}}
               for i in range(20)])
        return c

    ids = [str(i) for i in range(20)]
    assert empty_answers({"base": cache("b", 1), "compressed": cache("c2", 3)}, ids) == \
        {"base": 1, "compressed": 3, "too_many": False}  # 2 more of 20: not more than a tenth
    assert empty_answers({"base": cache("b1", 1), "compressed": cache("c4", 4)}, ids)["too_many"]  # 3 more
    assert empty_answers({"base": cache("b5", 5), "compressed": cache("c5", 5)}, ids)["too_many"] is False
