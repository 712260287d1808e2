"""Log-likelihood multiple choice: ARC-Easy / ARC-Challenge as lm-evaluation-harness defines them
(prompt, continuations, gold index, acc and acc_norm), the continuation log-probabilities they
rest on (lm-eval's tokenization; exact and batched for autoregressive models, the seeded masked
Monte Carlo estimate for diffusion models), and verify running them end to end and resuming.

Expected values come from the data files read here with json, from the model's own logits, or
from lm-eval's own tokenization code, never from the code under test."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import llada_from_llama, load, make_checkpoint, make_tokenizer, one_line, write_jsonl
from repskip.benchmark import Item, get_benchmark
from repskip.errors import RepskipError
from repskip.pipeline import open_model
from repskip.verify.likelihood import continuation_logprobs, encode_pair
from repskip.verify.run import verify

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arc"
EASY, CHALLENGE = DATA / "ARC-Easy-Test.jsonl", DATA / "ARC-Challenge-Test.jsonl"
needs_data = pytest.mark.skipif(not (EASY.is_file() and CHALLENGE.is_file()), reason=f"needs {DATA}")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


# --- the benchmarks -------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name, path, count", [("arc_easy", EASY, 2376), ("arc_challenge", CHALLENGE, 1172)])
def test_the_shared_files_load_as_lm_eval_defines_the_tasks(name, path, count):
    bench = get_benchmark(name)
    assert bench.kind == "multiple_choice" and bench.primary_metric == "acc_norm" and bench.higher_is_better
    items = bench.load(path)
    assert len(items) == count and len({it.id for it in items}) == count
    by_id = {it.id: it for it in items}
    label_sets = set()
    for row in rows(path):
        item, q = by_id[row["id"]], row["question"]
        labels = [c["label"] for c in q["choices"]]
        label_sets.add("".join(labels))
        assert item.prompt == f"Question: {q['stem']}\nAnswer:"
        assert bench.continuations(item) == [" " + c["text"] for c in q["choices"]]
        assert item.reference == labels.index(row["answerKey"]) and 0 <= item.reference < len(labels)
    assert {"ABCD", "1234"} <= label_sets  # and A-E in ARC-Easy's file
    if name == "arc_easy":
        assert "ABCDE" in label_sets
        first = by_id["Mercury_417466"]
        assert first.prompt == ("Question: Which statement best explains why photosynthesis is the foundation "
                                "of most food webs?\nAnswer:")
        assert bench.continuations(first)[0] == " Sunlight is the source of energy for nearly all ecosystems."
        assert first.reference == 0


def test_labels_of_any_kind_and_the_hub_layout(tmp_path):
    ai2 = [
        {"id": "a", "question": {"stem": "Q1?", "choices": [{"text": t, "label": l} for t, l in
                                                            zip("vwxyz", "ABCDE")]}, "answerKey": "E"},
        {"id": "b", "question": {"stem": "Q2?", "choices": [{"text": t, "label": l} for t, l in
                                                            zip(["one", "two", "three"], "123")]}, "answerKey": "2"},
    ]
    items = get_benchmark("arc_challenge").load(write_jsonl(tmp_path / "ai2.jsonl", ai2))
    assert [it.reference for it in items] == [4, 1]
    hub = [{"id": r["id"], "question": r["question"]["stem"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]},
            "answerKey": r["answerKey"]} for r in ai2]
    again = get_benchmark("arc_challenge").load(write_jsonl(tmp_path / "hub.jsonl", hub))
    assert [(i.id, i.prompt, i.reference, i.meta["choices"]) for i in again] == \
        [(i.id, i.prompt, i.reference, i.meta["choices"]) for i in items]


GOOD = {"id": "x1", "question": {"stem": "Why?", "choices": [{"text": "yes", "label": "A"},
                                                            {"text": "no", "label": "B"}]}, "answerKey": "B"}


@pytest.mark.parametrize("bad, says", [
    ({k: v for k, v in GOOD.items() if k != "answerKey"}, "no field 'answerKey'"),
    ({**GOOD, "answerKey": "C"}, "answerKey 'C' is not among the choice labels A, B"),
    ({**GOOD, "question": {"stem": "Why?", "choices": [{"text": "yes", "label": "A"}]}}, "two or more choices"),
    ({**GOOD, "question": {"stem": "Why?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "A"}]}},
     "repeat"),
    ({**GOOD, "question": {"stem": "Why?", "choices": "A) yes B) no"}}, "'choices' holds str, expected list"),
    ({**GOOD, "question": {"choices": GOOD["question"]["choices"]}}, "no field 'stem'"),
    ({**GOOD, "id": "x0"} | {"question": 5}, "'question' holds int"),
    ({**GOOD, "id": "x0"}, "id 'x0' is already used by line 1"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, bad, says):
    path = write_jsonl(tmp_path / "arc.jsonl", [{**GOOD, "id": "x0"}, bad])
    with pytest.raises(RepskipError) as exc:
        get_benchmark("arc_easy").load(path)
    message = one_line(exc)
    assert str(path) in message and "line 2" in message and says in message
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(RepskipError, match="line 2 is not valid JSON"):
        get_benchmark("arc_easy").load(path)


def test_options_and_the_default_source(monkeypatch, tmp_path):
    assert get_benchmark("arc_easy").options == {"mc_samples": 32}
    assert get_benchmark("arc_easy", mc_samples="8").options["mc_samples"] == 8
    for bad in ({"mc_samples": 0}, {"shots": 5}):
        with pytest.raises(RepskipError) as exc:
            get_benchmark("arc_easy", **bad)
        assert "arc_easy" in one_line(exc)
    from repskip_benchmarks import sources

    def unreachable(repo_id, filename, local_only):
        raise OSError("not cached")

    monkeypatch.setattr(sources, "_download", unreachable)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    for name in ("arc_easy", "arc_challenge"):
        with pytest.raises(RepskipError) as exc:
            get_benchmark(name).load(None)
        assert f"--data {name}=PATH" in one_line(exc) and "allenai/ai2_arc" in one_line(exc)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    hub_rows = [{"id": "h1", "question": "Q?", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "B"}]
    pq.write_table(pa.Table.from_pylist(hub_rows), tmp_path / "test.parquet")
    asked = []
    monkeypatch.setattr(sources, "_download", lambda repo, name, local_only: asked.append((repo, name)) or
                        str(tmp_path / "test.parquet"))
    (item,) = get_benchmark("arc_challenge").load(None)
    assert asked == [("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet")]
    assert (item.id, item.prompt, item.reference) == ("h1", "Question: Q?\nAnswer:", 1)


def test_acc_and_acc_norm_pick_as_lm_eval_does():
    bench = get_benchmark("arc_easy")
    item = Item("i", "Question: ?\nAnswer:", 1, {"choices": ["a", "much longer"]})
    # -2.0 beats -5.0 in total, but per character -5/11 beats -2/1
    assert bench.score_choices(item, [-2.0, -5.0]) == {"acc": 0.0, "acc_norm": 1.0}
    assert bench.score_choices(item, [-6.0, -5.0]) == {"acc": 1.0, "acc_norm": 1.0}
    assert bench.score_choices(item, [-1.0, -22.0]) == {"acc": 0.0, "acc_norm": 0.0}
    assert bench.score_choices(item, [-3.0, -3.0]) == {"acc": 0.0, "acc_norm": 1.0}  # ties: the first
    three = Item("j", "c", 0, {"choices": ["ab", "cd", "ef"]})
    assert bench.score_choices(three, [-4.0, -4.0, -9.0]) == {"acc": 1.0, "acc_norm": 1.0}


# --- tokenization as lm-eval's hf model makes it ------------------------------------------------


def bos_tokenizer():
    """The tiny byte-level tokenizer, prepending a BOS as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok.bos_token = "<|im_start|>"
    return tok


def lm_eval_pair(tokenizer, context, continuation):
    """lm-eval's own TemplateLM._encode_pair over HFLM.tok_encode, on a stand-in model."""
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stub = types.SimpleNamespace(tokenizer=tokenizer, add_bos_token=None, backend="causal", prefix_token_id=prefix)
    stub.tok_encode = lambda s, **kw: HFLM.tok_encode(stub, s, **kw)
    return TemplateLM._encode_pair(stub, context, continuation)


@pytest.mark.parametrize("context, continuation", [
    ("Question: Why?\nAnswer:", " Because."), ("The cat sat on ", "the mat"), ("<|im_start|>Hi", " there"),
    ("abc\n\n", "def"),
])
def test_pairs_are_tokenized_as_lm_eval_does(context, continuation):
    for tok in (make_tokenizer(), bos_tokenizer()):
        assert encode_pair(tok, context, continuation) == lm_eval_pair(tok, context, continuation)
    ctx, cont = encode_pair(bos_tokenizer(), "The cat sat on ", "the mat")
    bos = bos_tokenizer().bos_token_id
    assert ctx[0] == bos and bos not in cont and cont[0] == bos_tokenizer().encode(" ", add_special_tokens=False)[0]
    ctx, _ = encode_pair(bos_tokenizer(), "<|im_start|>Hi", " there")
    assert ctx.count(bos) == 1  # a context that starts with the BOS text gets no second one
    assert encode_pair(make_tokenizer(), "", "ab")[0] == [make_tokenizer().eos_token_id]  # no BOS: EOS stands in


# --- log-probabilities ----------------------------------------------------------------------------

PAIRS = [("Question: Why is the sky blue?\nAnswer:", " Rayleigh scattering"), ("Question: Why is the sky blue?\nAnswer:", " paint"),
         ("abc", "d"), ("The cat sat on ", "the mat"), ("Question: 2+2?\nAnswer:", " four, surely, as everyone knows")]


def test_autoregressive_logprobs_are_exact_and_batching_changes_nothing(tiny):
    handle = open_model(tiny["qwen2"])
    model, tok = handle.load(None, "cpu"), handle.family.load_tokenizer(handle.path)
    batched = continuation_logprobs(model, handle.family, tok, PAIRS, batch_size=len(PAIRS))
    alone = [continuation_logprobs(model, handle.family, tok, [pair], batch_size=1)[0] for pair in PAIRS]
    twos = continuation_logprobs(model, handle.family, tok, PAIRS, batch_size=2)
    for (a, ga), (b, gb), (c, gc) in zip(batched, alone, twos):
        assert abs(a - b) < 1e-5 and abs(c - b) < 1e-5 and ga == gb == gc
    reference = load(tiny["qwen2"])
    for (context, continuation), (logprob, greedy) in zip(PAIRS, batched):
        stripped = context.rstrip()  # the trailing space goes with the continuation, as in lm-eval
        ctx, whole = tok.encode(stripped), tok.encode(context + continuation)
        with torch.no_grad():
            logp = F.log_softmax(reference(torch.tensor([whole])).logits[0].double(), -1)
        target = whole[len(ctx):]
        want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(target))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == all(logp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(target))
    assert all(lp < 0 for lp, _ in batched)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_shared_contexts_give_what_whole_sequences_give(tiny, family, monkeypatch):
    """Choices sharing a context run it once, on a KV cache; a model with layers removed
    too. The result must equal running every pair whole (the path ONNX models take)."""
    import repskip.verify.likelihood as likelihood

    handle = open_model(tiny[family])
    model, tok = handle.load(None, "cpu"), handle.family.load_tokenizer(handle.path)
    pairs = PAIRS + [("Question: Why is the sky blue?\nAnswer:", " because"), ("x", " y z w v u t")]
    for kept in (None, [0, 2, 3]):
        if kept:
            handle.family.remove_layers(model, kept)
        assert likelihood._caches(model)
        shared = continuation_logprobs(model, handle.family, tok, pairs, batch_size=len(pairs))
        monkeypatch.setattr(likelihood, "_caches", lambda m: False)
        whole = continuation_logprobs(model, handle.family, tok, pairs, batch_size=len(pairs))
        monkeypatch.undo()
        for (a, ga), (b, gb) in zip(shared, whole):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert not likelihood._caches(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc-llada")
    return llada_from_llama(make_checkpoint(root / "llama", "llama", seed=3, tie_word_embeddings=False), root / "llada")


def test_diffusion_estimate_is_seeded_and_batch_independent(llada):
    handle = open_model(llada)
    fam = handle.family
    model, tok, mask_id = fam.load(handle.path), fam.load_tokenizer(handle.path), fam.mask_token_id(handle.ckpt.config)

    def run(pairs, **kw):
        return continuation_logprobs(model, fam, tok, pairs, mask_id=mask_id, **{"mc_samples": 4, "seed": 0, **kw})

    first = run(PAIRS, batch_size=len(PAIRS))
    assert first == run(PAIRS, batch_size=len(PAIRS))  # deterministic
    assert all(lp < 0 and isinstance(g, bool) for lp, g in first)
    other = run(PAIRS, seed=1, batch_size=len(PAIRS))
    assert any(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(first, other))  # the draws follow the seed
    alone = [run([pair], batch_size=1)[0] for pair in PAIRS]  # the same masks in any batch
    for (a, ga), (b, gb) in zip(first, alone):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)) and ga == gb
    with pytest.raises(ValueError, match="mask token"):
        continuation_logprobs(model, fam, tok, PAIRS[:1])


# --- verify ---------------------------------------------------------------------------------------


@needs_data
def test_verify_a_model_against_itself_on_arc_easy(tiny, tmp_path):
    from click.testing import CliRunner

    from repskip.cli import main

    out = tmp_path / "v"
    res = CliRunner().invoke(main, ["verify", str(tiny["llama"]), str(tiny["llama"]), "--bench", "arc_easy",
                                    "--data", f"arc_easy={EASY}", "--limit", "12", "-o", str(out)])
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "report.json").read_text())["benchmarks"]["arc_easy"]
    assert entry["items"] == 12 and entry["metric"] == "acc_norm" and entry["higher_is_better"] is True
    assert entry["retention"] == 1.0 and entry["retention_ci95"] == [1.0, 1.0]
    assert entry["test"] == "mcnemar-exact" and entry["p_value"] == 1.0
    assert entry["base"] == entry["compressed"] == entry["metrics"]["acc_norm"]["base"]
    assert set(entry["metrics"]) == {"acc", "acc_norm"} and 0 <= entry["metrics"]["acc"]["base"] <= 1
    assert entry["settings"] == {"loglikelihood": "exact next-token"} and "flops" not in entry
    assert entry["throughput"]["base"]["tokens"] > 0 and entry["throughput"]["base"]["tokens_per_s"] > 0
    assert "| arc_easy | 12 | acc_norm |" in (out / "report.md").read_text()
    (cache,) = (out / "cache").rglob("arc_easy-*.jsonl")
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    first = rows(EASY)[0]
    assert len(records) == 12 and records[0]["id"] == first["id"]
    assert len(records[0]["logprobs"]) == len(first["question"]["choices"])
    assert set(records[0]["metrics"]) == {"acc", "acc_norm"}


@needs_data
def test_an_interrupted_run_resumes_without_recomputing(tiny, tmp_path, llada):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nresolved: {remove: [1]}\n")
    kwargs = dict(recipe=recipe, benches=["arc_easy"], data={"arc_easy": str(EASY)}, limit=6, batch_size=2)
    whole = verify(tiny["llama"], output=tmp_path / "whole", **kwargs)

    def stop_midway(label, done, total):
        if label == "arc_easy compressed" and done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify(tiny["llama"], output=tmp_path / "resumed", progress=stop_midway, **kwargs)
    cached = list((tmp_path / "resumed" / "cache").rglob("arc_easy-*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in cached) == 6 + 2  # base done, 2 of compressed
    progress = []
    resumed = verify(tiny["llama"], output=tmp_path / "resumed", progress=lambda *a: progress.append(a[:2]), **kwargs)
    assert progress[0] == ("arc_easy base", 6)  # nothing left for the base model
    keys = ("items", "base", "compressed", "retention", "retention_ci95", "p_value", "metrics")
    assert {k: resumed["benchmarks"]["arc_easy"][k] for k in keys} == {k: whole["benchmarks"]["arc_easy"][k] for k in keys}
    for path in (tmp_path / "resumed" / "cache").rglob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 6, f"{path.name} computed an item twice"
    # a diffusion model: the masked estimate, its draws set by the benchmark option
    report = verify(llada, llada, benches=["arc_easy"], data={"arc_easy": str(EASY)}, limit=2,
                    bench_options={"arc_easy": {"mc_samples": "2"}}, output=tmp_path / "d")
    entry = report["benchmarks"]["arc_easy"]
    assert entry["settings"] == {"loglikelihood": "masked Monte Carlo estimate", "mc_samples": 2}
    assert entry["retention"] == 1.0


@needs_data
@pytest.mark.slow
def test_smollm2_logprobs_equal_lm_eval_hf_model():
    """On the real SmolLM2-135M tokenizer (BPE merges, a BOS token it does not add) and weights:
    the same tokens as lm-eval's code on every ARC-Easy pair, the same log-probabilities as
    lm-eval's own hf model on a few items."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from repskip.default_model import ensure_default_model

    path = ensure_default_model()
    handle = open_model(path)
    tok = handle.family.load_tokenizer(handle.path)
    bench = get_benchmark("arc_easy")
    items = bench.load(EASY)
    pairs = [(it.prompt, cont) for it in items[:300] for cont in bench.continuations(it)]
    assert all(encode_pair(tok, *pair) == lm_eval_pair(tok, *pair) for pair in pairs)
    pairs = pairs[:12]
    ours = continuation_logprobs(handle.load(None, "cpu"), handle.family, tok, pairs, batch_size=len(pairs))
    lm = HFLM(pretrained=str(path), dtype="float32", device="cpu", batch_size=4)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                              disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
