"""self-calibrate: the model's own answers as calibration text, the same file under the same
seed, hashed into the recipe like any other source, and readable by heal."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from helpers import one_line_error
from repskip import pipeline
from repskip.analyze import calibration, self_calibration
from repskip.cli import main
from repskip.sampler import format_prompt, get_sampler


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


ARGS = ["--num-samples", "5", "--max-new-tokens", "12", "--batch-size", "2"]


def test_the_answers_are_the_models_own_and_the_same_under_a_seed(tiny, tmp_path):
    out = tmp_path / "calib.jsonl"
    res = run("self-calibrate", tiny["qwen2"], "-o", out, *ARGS)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    prompts, _ = self_calibration.pick_prompts(None, None, 5, 0)
    assert [r["prompt"] for r in records] == prompts and len(set(prompts)) == 5
    assert set(prompts) <= set(self_calibration.builtin_prompts())
    # each answer is what the model's own sampler gives the chat-formatted prompt, greedily
    handle = pipeline.open_model(tiny["qwen2"])
    tokenizer = handle.family.load_tokenizer(handle.path)
    shown = [format_prompt(tokenizer, p, chat=True) for p in prompts]
    assert all(s.startswith("<|im_start|>user\n") for s in shown)
    answers = get_sampler(handle.family.default_sampler, handle.family).generate(
        handle.load(), tokenizer, shown, family=handle.family, max_new_tokens=12, batch_size=2).texts
    assert [r["response"] for r in records] == answers and any(answers)
    assert [r["text"] for r in records] == [s + a for s, a in zip(shown, answers)]
    # the same command again: the same bytes (greedy); sampled under a seed: the same again
    again = tmp_path / "again.jsonl"
    assert run("self-calibrate", tiny["qwen2"], "-o", again, *ARGS).exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    sampled = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    for path, seed in zip(sampled, (1, 1, 2)):
        res = run("self-calibrate", tiny["qwen2"], "-o", path, *ARGS, "--temperature", "1.0", "--seed", seed)
        assert res.exit_code == 0, res.output
    assert sampled[0].read_bytes() == sampled[1].read_bytes() != sampled[2].read_bytes()


def test_the_file_is_a_calibration_source_and_healing_data(tiny, tmp_path):
    out = tmp_path / "calib.jsonl"
    assert run("self-calibrate", tiny["llama"], "-o", out, *ARGS).exit_code == 0
    res = run("analyze", tiny["llama"], "-o", tmp_path / "a", "--calib", out, "--strategy", "block-influence", "-k", "1",
              "--repair", "none", "--num-samples", "5", "--max-length", "64")
    assert res.exit_code == 0, res.output
    recipe = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    tokenizer = pipeline.open_model(tiny["llama"]).family.load_tokenizer(tiny["llama"])
    expected = calibration.build(tokenizer, str(out), num_samples=5, max_length=64)
    assert recipe["calibration"]["source"] == str(out)
    assert recipe["resolved"]["calibration_hash"] == expected.hash
    from repskip.train.data import read_documents

    docs, _ = read_documents(str(out))
    assert docs == [json.loads(line)["text"] for line in out.read_text().splitlines()]


def test_a_file_self_calibrate_did_not_write_is_never_replaced(tiny, tmp_path):
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"text": "my own notes"}\n')
    one_line_error(run("self-calibrate", tiny["llama"], "-o", mine, *ARGS, "--force"), "repskip did not write it")
    assert mine.read_text() == '{"text": "my own notes"}\n'
    ours = tmp_path / "calib.jsonl"
    assert run("self-calibrate", tiny["llama"], "-o", ours, *ARGS).exit_code == 0
    one_line_error(run("self-calibrate", tiny["llama"], "-o", ours, *ARGS), "already exists")
    assert run("self-calibrate", tiny["llama"], "-o", ours, *ARGS, "--force").exit_code == 0
