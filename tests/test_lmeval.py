"""The lm-evaluation-harness adapter: likelihoods and generations equal repskip's own, and
a local-file lm-eval task runs offline on a repskip model with a recipe applied."""

import json

import pytest
import torch
import yaml
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from helpers import llada_from_llama, load, make_checkpoint  # noqa: E402
from repskip.verify.lmeval import RepskipLM  # noqa: E402
from repskip.sampler import get_sampler  # noqa: E402


class Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_the_exact_next_token_sum(tiny):
    lm = RepskipLM(pretrained=str(tiny["llama"]))
    (logprob, greedy), = lm.loglikelihood([Req("The cat sat on", " the mat")])
    model = load(tiny["llama"])
    ctx = lm.tok("The cat sat on")["input_ids"]
    cont = lm.tok(" the mat", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1], -1)
    want = logp.gather(-1, ids[0, len(ctx):, None]).sum().item()
    assert logprob == pytest.approx(want, abs=1e-4)
    assert greedy == bool((logp.argmax(-1) == ids[0, len(ctx):]).all())
    (rolling,) = lm.loglikelihood_rolling([Req("The cat sat on the mat")])
    assert rolling < 0


def test_generate_until_is_the_family_sampler_cut_at_the_stop(tiny):
    lm = RepskipLM(pretrained=str(tiny["qwen2"]))
    (text,) = lm.generate_until([Req("hello", {"until": ["zz"], "max_gen_toks": 6})])
    direct = get_sampler("ar").generate(lm.model, lm.tok, ["hello"], family=lm.family, max_new_tokens=6).texts[0]
    assert text == direct.split("zz")[0]


def test_recipe_and_diffusion_models(tmp_path, tiny):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1, 2]}\n")
    lm = RepskipLM(pretrained=str(tiny["llama"]), recipe=str(recipe))
    assert lm.removed == [1, 2] and len(lm.model.model.layers) == 4
    llada = llada_from_llama(make_checkpoint(tmp_path / "l", "llama", tie_word_embeddings=False), tmp_path / "d")
    dlm = RepskipLM(pretrained=str(llada), mc_samples=4)
    a = dlm.loglikelihood([Req("abc", "def")])
    assert a == dlm.loglikelihood([Req("abc", "def")]) and a[0][0] < 0  # seeded estimate
    (text,) = dlm.generate_until([Req("abc", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(text, str)


def test_a_local_file_task_runs_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "toy.jsonl"
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy_mc.yaml").write_text(f"""task: repskip_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    from lm_eval.tasks import TaskManager

    lm = RepskipLM(pretrained=str(tiny["qwen2"]))
    results = lm_eval.simple_evaluate(model=lm, tasks=["repskip_toy_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                      log_samples=False, bootstrap_iters=0)
    acc = results["results"]["repskip_toy_mc"]["acc,none"]
    # the same choice by hand: the higher log-likelihood of " yes" / " no" after the question
    right = 0
    for r in rows:
        scores = [lm.loglikelihood([Req(r["question"], " " + c)])[0][0] for c in r["choices"]]
        right += int(max(range(2), key=lambda i: scores[i]) == r["label"])
    assert acc == pytest.approx(right / len(rows))


def test_lm_eval_cli_on_a_local_task(tiny, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from repskip.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"q": f"Count to {i}:", "a": str(i)}) + "\n" for i in range(3)))
    (tmp_path / "toy_gen.yaml").write_text(f"""task: repskip_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""")
    out = tmp_path / "res.json"
    res = CliRunner().invoke(main, ["lm-eval", str(tiny["llama"]), "--tasks", "repskip_toy_gen", "--include-path",
                                    str(tmp_path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "repskip.lm-eval" and doc["schema_version"] == 1
    assert "exact_match,none" in doc["results"]["repskip_toy_gen"]
    bad = CliRunner().invoke(main, ["lm-eval", str(tiny["llama"]), "--tasks", "no_such_task_xyz"])
    assert bad.exit_code == 1 and "knows no task 'no_such_task_xyz'" in bad.stderr
    bad = CliRunner().invoke(main, ["lm-eval", str(tiny["llama"]), "--tasks", "repskip_toy_gen", "--batch-size", "0"])
    assert bad.exit_code == 1 and "--batch-size takes a positive number or auto" in bad.stderr


def test_batches_by_count_or_by_padded_tokens_change_no_score(tiny):
    """--batch-size N and auto (a padded-token budget) batch differently, never score differently."""
    from repskip.verify import likelihood

    assert likelihood._chunks([0, 1, 2, 3, 4], [10, 9, 5, 5, 2], 3, None) == [[0, 1, 2], [3, 4]]
    assert likelihood._chunks([0, 1, 2, 3, 4], [10, 9, 5, 5, 2], 100, 20) == [[0, 1], [2, 3, 4]]
    assert likelihood._chunks([0, 1], [30, 2], 8, 20) == [[0], [1]]  # a pair longer than the budget runs alone
    from repskip.verify.lmeval import RepskipLM

    pairs = [("Question: why?\nAnswer:", " because"), ("Question: why?\nAnswer:", " no"), ("abc", " d e f g"),
             ("x" * 50, " y")]
    requests = [type("R", (), {"args": p})() for p in pairs]
    by_count = RepskipLM(pretrained=str(tiny["llama"]), batch_size=2).loglikelihood(requests)
    auto = RepskipLM(pretrained=str(tiny["llama"]), batch_size="auto")
    assert auto.auto_batch and auto.batch_size > 8
    for (a, ga), (b, gb) in zip(by_count, auto.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_an_onnx_export_is_an_lm_eval_model(tiny, tmp_path):
    from repskip import pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1, 2]}\n")
    pipeline.compress(tiny["llama"], recipe, tmp_path / "onnx", format="onnx")
    pipeline.compress(tiny["llama"], recipe, tmp_path / "st")
    on_ort = RepskipLM(pretrained=str(tmp_path / "onnx"), provider="cpu")
    on_pt = RepskipLM(pretrained=str(tmp_path / "st"))
    reqs = [Req("The cat sat on", " the mat"), Req("abc", "def")]
    for (a, ga), (b, gb) in zip(on_ort.loglikelihood(reqs), on_pt.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    gen = Req("hello", {"until": ["zz"], "max_gen_toks": 6})
    assert on_ort.generate_until([gen]) == on_pt.generate_until([gen])
    with pytest.raises(Exception, match="needs the original safetensors checkpoint"):
        RepskipLM(pretrained=str(tmp_path / "onnx"), recipe=str(recipe))


def test_a_repaired_recipe_scores_as_its_compressed_checkpoint(tiny, tmp_path):
    from click.testing import CliRunner

    from repskip.cli import main

    runs, out = tmp_path / "runs", tmp_path / "out"
    for args in (["analyze", str(tiny["llama"]), "-o", str(runs), "--strategy", "block-influence", "-k", "2",
                  "--repair", "linear", "--num-samples", "4", "--max-length", "16"],
                 ["compress", str(tiny["llama"]), "--recipe", str(runs / "recipe.yaml"), "-o", str(out)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    request = [Req("The cat sat on", " the mat")]
    in_memory = RepskipLM(pretrained=str(tiny["llama"]), recipe=str(runs / "recipe.yaml")).loglikelihood(request)
    written = RepskipLM(pretrained=str(out)).loglikelihood(request)
    assert RepskipLM(pretrained=str(out)).model.config.num_hidden_layers == 4
    layers = yaml.safe_load((runs / "recipe.yaml").read_text())["resolved"]["remove"]
    plain_recipe = tmp_path / "plain.yaml"
    plain_recipe.write_text(f"schema_version: 1\nresolved: {{remove: {layers}}}\n")
    plain = RepskipLM(pretrained=str(tiny["llama"]), recipe=str(plain_recipe)).loglikelihood(request)
    assert in_memory[0][0] == pytest.approx(written[0][0], abs=1e-4)
    assert abs(in_memory[0][0] - plain[0][0]) > 1e-4  # the maps were applied, not only the removal


def test_a_model_spread_over_memory_and_disk_scores_as_in_memory(tiny, tmp_path):
    """device_map with 600 kB allowed: the decoder layers wait in a fresh folder inside the
    given one (removed with the adapter), and every score and generation is the in-memory one;
    a repaired recipe, whose maps cannot fold into weights left on disk, is refused in one line."""
    import gc

    from repskip.errors import RepskipError

    requests = [Req("The cat sat on", " the mat"), Req("hello", " world")]
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's")
    whole = RepskipLM(pretrained=str(tiny["llama"]))
    spread = RepskipLM(pretrained=str(tiny["llama"]), device_map="auto", max_memory="600kB",
                       offload_folder=str(tmp_path))
    assert "disk" in set(spread.model.hf_device_map.values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("repskip-offload-")]
    assert spread.loglikelihood(requests) == whole.loglikelihood(requests)
    generation = [Req("hello", {"until": ["zz"], "max_gen_toks": 6})]
    assert spread.generate_until(generation) == whole.generate_until(generation)
    del spread
    gc.collect()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"] and mine.read_text() == "the user's"
    runs = tmp_path / "runs"
    from click.testing import CliRunner

    from repskip.cli import main

    res = CliRunner().invoke(main, ["analyze", str(tiny["llama"]), "-o", str(runs), "-k", "2", "--repair", "linear",
                                    "--num-samples", "4", "--max-length", "16"])
    assert res.exit_code == 0, res.output
    with pytest.raises(RepskipError, match="waits on disk|wait on disk"):
        RepskipLM(pretrained=str(tiny["llama"]), recipe=str(runs / "recipe.yaml"), device_map="auto",
                  max_memory="600kB", offload_folder=str(tmp_path))
