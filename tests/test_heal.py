"""`repskip heal`: LoRA and full fine-tuning of the layers around each cut, for AR and
diffusion families; the written checkpoint, the training record, resuming a killed run, and
every bad input refused in one line with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from helpers import dream_from_qwen2, llada_from_llama, load, make_checkpoint, write_jsonl
from repskip import pipeline
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.train import state as _state
from repskip.train.data import pack, read_documents
from repskip.train.heal import HealSettings, cut_neighbours, heal, lr_at, state_folder

pytest.importorskip("peft")

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "valid.txt"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, lines
    assert message in lines[-1], lines[-1]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def cut(base: Path, out: Path, remove: list[int]) -> Path:
    recipe = out.parent / f"{out.name}-recipe.yaml"
    recipe.write_text(yaml.safe_dump({"schema_version": 1, "resolved": {"remove": remove}}))
    pipeline.compress(base, recipe, out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not TEXT.is_file():
        pytest.skip("needs ../shared/data/wikitext2")
    root = tmp_path_factory.mktemp("heal")
    llama = make_checkpoint(root / "llama", "llama", seed=3)
    qwen2 = make_checkpoint(root / "qwen2", "qwen2", seed=4)
    llada = llada_from_llama(llama, root / "llada")
    dream = dream_from_qwen2(qwen2, root / "dream")
    data = root / "data.txt"
    data.write_text(TEXT.read_text("utf-8")[:40000])
    return {
        "root": root, "data": data, "llama": llama, "qwen2": qwen2, "llada": llada, "dream": dream,
        "llama-k2": cut(llama, root / "llama-k2", [2, 3]),
        "llada-k2": cut(llada, root / "llada-k2", [2, 3]),
        "dream-k2": cut(dream, root / "dream-k2", [1, 4]),
    }


FAST = dict(seq_len=32, batch_size=4, eval_sequences=8)


# --- the pieces ---------------------------------------------------------------------------------
def test_cut_neighbours_are_the_kept_layers_beside_each_run():
    # 10 layers, 3-4 and 7 removed: kept 0 1 2 5 6 8 9 -> new indices 0..6
    assert cut_neighbours([3, 4, 7], 10, 1) == [2, 3, 4, 5]  # old 2, 5 | old 6, 8
    assert cut_neighbours([3, 4, 7], 10, 2) == [1, 2, 3, 4, 5, 6]
    assert cut_neighbours([0, 1], 6, 1) == [0]  # nothing before the first layer
    assert cut_neighbours([5], 6, 1) == [4]


def test_learning_rate_warms_up_then_decays_to_zero():
    s = HealSettings(steps=100, lr=1e-3, warmup=0.1)
    rates = [lr_at(s, i) for i in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # never rises after the warm-up
    assert rates[-1] < 1e-5 and rates[55] == pytest.approx(5e-4, rel=0.01)  # half way down the cosine


def test_data_from_a_folder_and_jsonl_is_packed_with_end_of_text_between_documents(models, tmp_path):
    tok = pipeline.open_model(models["llama"]).family.load_tokenizer(models["llama"])
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma " * 40)
    write_jsonl(folder / "b.jsonl", [{"body": "delta epsilon " * 30}, {"body": "  "}])
    (folder / ".hidden.txt").write_text("never read")
    with pytest.raises(RepskipError, match="--text-field"):
        read_documents(str(folder))
    docs, source = read_documents(str(folder), "body")
    assert len(docs) == 2 and "never" not in "".join(docs)
    data = pack(tok, docs, source, 16, 2)
    stream = data.train.flatten().tolist() + data.held_out.flatten().tolist()
    assert tok.eos_token_id in stream  # the join between the two documents
    assert data.held_out.shape == (2, 16) and data.train.shape[0] >= 1
    with pytest.raises(RepskipError, match="full sequence"):
        pack(tok, ["tiny"], "x", 64, 0)


# --- healing ----------------------------------------------------------------------------------
def test_lora_heal_changes_only_the_layers_beside_the_cut_and_distils(models, tmp_path):
    out = tmp_path / "healed"
    res = run("heal", models["llama-k2"], "--teacher", models["llama"], "--data", models["data"], "-o", out,
              "--steps", "40", "--lr", "3e-3", "--seq-len", "32", "--eval-sequences", "8", "--eval-every", "40")
    assert res.exit_code == 0, res.output
    before, after = tensors(models["llama-k2"]), tensors(out)
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    # 6 layers, 2-3 removed: the cut sits between new layers 1 and 2; each has 7 linear layers
    assert changed and {k.split(".")[2] for k in changed} == {"1", "2"}
    assert all(k.endswith("_proj.weight") for k in changed) and len(changed) == 14
    record = json.loads((out / "heal.json").read_text())
    assert record["kind"] == "repskip.heal" and record["layers"] == [1, 2] and record["objective"] == "causal-lm"
    assert record["data"]["tokens_sha256"].startswith("sha256:") and record["settings"]["steps"] == 40
    ev = record["history"]["eval"]
    assert [e["step"] for e in ev] == [0, 40] and ev[-1]["kd"] < 0.8 * ev[0]["kd"]
    assert record["written_max_logit_diff"] < 1e-4
    model = load(out)  # plain transformers, same architecture
    assert model.config.num_hidden_layers == 4
    assert (out / "repskip-recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert not state_folder(out).exists()  # the resumable state goes once the output is in place


def test_full_fine_tuning_trains_every_tensor_of_the_chosen_layers(models, tmp_path):
    out = tmp_path / "full"
    heal(models["llama-k2"], out, data=str(models["data"]), teacher=models["llama"],
         settings=HealSettings(method="full", layers="0", steps=3, lr=1e-3, **FAST))
    before, after = tensors(models["llama-k2"]), tensors(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    layer0 = {k for k in before if k.startswith("model.layers.0.")}
    assert changed == layer0 and any("norm" in k for k in changed)


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_train_embeddings_with_every_layer_trains_the_whole_model(models, tmp_path, family):
    # training from scratch (bench/ar_vs_diffusion.py): every tensor on disk changes, the tied
    # Llama embedding included, and the written model is the trained one
    out = tmp_path / "whole"
    res = run("heal", models[family], "--data", models["data"], "-o", out, "--method", "full", "--layers", "all",
              "--train-embeddings", "--loss", "lm", "--steps", "2", "--lr", "1e-3", "--seq-len", "32",
              "--eval-sequences", "8")
    assert res.exit_code == 0, res.output
    before, after = tensors(models[family]), tensors(out)
    assert before.keys() == after.keys()
    assert sorted(k for k in before if torch.equal(before[k], after[k])) == []
    record = json.loads((out / "heal.json").read_text())
    assert record["settings"]["train_embeddings"] is True and len(record["tensors"]) == len(before)
    assert record["trainable_parameters"] == sum(t.numel() for t in before.values())
    assert record["written_max_logit_diff"] < 1e-4


def test_train_embeddings_needs_full_fine_tuning(models, tmp_path):
    res = run("heal", models["llama"], "--data", models["data"], "-o", tmp_path / "x", "--layers", "all",
              "--train-embeddings", "--loss", "lm")
    assert_clean_error(res, "--train-embeddings")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_diffusion_models_heal_with_the_masked_diffusion_objective_and_still_sample(models, tmp_path, family):
    out = tmp_path / f"{family}-healed"
    result = heal(models[f"{family}-k2"], out, data=str(models["data"]),
                  settings=HealSettings(loss="lm", steps=40, lr=3e-3, layers="all", **FAST), eval_every=40)
    record = result.record
    assert record["objective"] == "masked-diffusion"
    ev = record["history"]["eval"]
    assert ev[-1]["lm"] < ev[0]["lm"] - 0.05, ev  # the held-out masked-token loss, fixed masks
    before, after = tensors(models[f"{family}-k2"]), tensors(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    res = run("generate", out, "--prompt", "hello", "--seed", "0")
    assert res.exit_code == 0, res.output


def test_diffusion_heal_distils_from_its_teacher(models, tmp_path):
    result = heal(models["llada-k2"], tmp_path / "kd", data=str(models["data"]), teacher=models["llada"],
                  settings=HealSettings(steps=30, lr=3e-3, **FAST), eval_every=30)
    ev = result.record["history"]["eval"]
    assert ev[-1]["kd"] < ev[0]["kd"] and result.record["layers"] == [1, 2]


def test_a_killed_heal_resumes_and_ends_with_the_uninterrupted_weights(models, tmp_path):
    settings = dict(steps=7, lr=3e-3, grad_accum=2, **FAST)
    kw = dict(data=str(models["data"]), teacher=models["llama"], save_every=2)
    straight_run = heal(models["llama-k2"], tmp_path / "straight", settings=HealSettings(**settings), **kw).record
    assert straight_run["seconds"] == straight_run["seconds_this_run"] > 0

    class Killed(Exception):
        pass

    def die(step):
        if step == 5:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        heal(models["llama-k2"], out, settings=HealSettings(**settings), on_step=die, **kw)
    assert not out.exists() and (state_folder(out) / "state.safetensors").is_file()
    first_run = _state.peek(state_folder(out))["seconds"]  # the time of the 4 steps the state holds
    assert first_run > 0
    result = heal(models["llama-k2"], out, settings=HealSettings(**settings), **kw)
    assert result.record["resumed_from"] == 4
    # the record's time is the whole training's: the killed run's kept steps and this run's
    assert result.record["seconds"] == pytest.approx(first_run + result.record["seconds_this_run"], abs=0.11)
    a, b = tensors(tmp_path / "straight"), tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight = json.loads((tmp_path / "straight" / "heal.json").read_text())["history"]
    assert result.record["history"]["train"] == straight["train"]


def test_a_state_of_other_settings_is_not_resumed(models, tmp_path):
    out = tmp_path / "h"
    kw = dict(data=str(models["data"]), teacher=models["llama"], save_every=1)

    def die(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(models["llama-k2"], out, settings=HealSettings(steps=4, **FAST), on_step=die, **kw)
    with pytest.raises(RepskipError, match=r"other settings \(lr\).*--no-resume"):
        heal(models["llama-k2"], out, settings=HealSettings(steps=4, lr=1e-3, **FAST), **kw)
    result = heal(models["llama-k2"], out, settings=HealSettings(steps=4, lr=1e-3, **FAST), resume=False, **kw)
    assert result.record["resumed_from"] is None and out.is_dir()


# --- bad input --------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    k2, data = models["llama-k2"], models["data"]
    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(models["llama"], other_vocab)
    tok = json.loads((other_vocab / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["renamed"] = vocab.pop(first)
    (other_vocab / "tokenizer.json").write_text(json.dumps(tok))
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("too short")
    out = tmp_path / "out"
    cases = [
        (["--teacher", models["qwen2"]], "the teacher is a qwen2 (hf-decoder) model"),
        (["--teacher", other_vocab], "vocabulary"),
        (["--teacher", models["llada"]], "the teacher is a llada model"),
        (["--data", tiny_text], "full sequence"),
        (["-o", k2 / "inside"], "refusing to write"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--loss", "kd", "--teacher", None], "pass --teacher"),
        (["--data", tmp_path / "missing.txt"], "does not exist"),
        (["--layers", "9"], "not a layer of this model"),
    ]
    for extra, message in cases:
        args = {"--teacher": models["llama"], "--data": data, "-o": out, "--steps": "2", "--seq-len": "32"}
        flags = []
        for i in range(0, len(extra), 2):
            args[extra[i]] = extra[i + 1]
            if extra[i + 1] is None:
                del args[extra[i]]
        for key, value in args.items():
            flags += [key, value]
        res = run("heal", k2, *flags)
        assert_clean_error(res, message)
        assert not out.exists() and not state_folder(out).exists()
        assert not (k2 / "inside").exists()
    res = run("heal", k2, "--teacher", models["llama"], "--data", data, "-o", out, "--fsdp")
    assert_clean_error(res, "torchrun --nproc_per_node N")  # nothing to shard over in one process
    assert not out.exists() and not state_folder(out).exists()


def test_without_a_recipe_around_cuts_asks_for_layers(models, tmp_path):
    res = run("heal", models["llama"], "--data", models["data"], "-o", tmp_path / "o", "--steps", "1")
    assert_clean_error(res, "--layers all")


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_a_healed_model_exports_to_onnx_as_it_is(models, tmp_path, family):
    pytest.importorskip("onnxruntime")
    healed = tmp_path / "healed"
    heal(models[f"{family}-k2"], healed, data=str(models["data"]),
         settings=HealSettings(loss="lm", steps=2, lr=1e-3, **FAST))
    res = run("compress", healed, "--format", "onnx", "-o", tmp_path / "onnx")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "onnx" / "repskip-onnx.json").read_text())
    assert meta["removed"] == [] and len(meta["kept"]) == 4
    recipe = yaml.safe_load((tmp_path / "onnx" / "repskip-recipe.yaml").read_text())
    assert recipe["resolved"]["remove"] == [2, 3]  # the cut the healed model carries
    length = ["--max-new-tokens", "4"] if family == "llama" else ["--gen-length", "4", "--steps", "4", "--block-length", "4"]
    res = run("generate", tmp_path / "onnx", "--prompt", "hello", *length)
    assert res.exit_code == 0, res.output
    assert_clean_error(run("compress", healed, "-o", tmp_path / "x"), "only --format onnx")


def _launch(*args: str, processes: int = 1, timeout: int = 300) -> None:
    """Run ``args`` (a module and its arguments, or a script) in one process, or under torchrun
    in ``processes`` CPU processes (gloo); the run must succeed."""
    import os
    import subprocess
    import sys

    # --standalone: a free port for the rendezvous, whatever else runs on the machine
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 \
        else []
    done = subprocess.run([sys.executable, *launcher, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


# slow: torch.distributed.run with two processes, three times; one process's resume is in the
# default suite (test_a_heal_killed_with_sigkill_resumes_to_the_same_weights)
@pytest.mark.slow
def test_two_processes_split_each_batch_and_end_where_one_process_does(models, tmp_path):
    """torchrun with 2 CPU processes (gloo) and --batch-size 2 sees the sequences one process
    with --batch-size 4 sees, and averages the same gradients: data parallel, and with --fsdp
    each process holding half of the student, the teacher and the LoRA optimiser's moments."""
    common = ["-m", "repskip", "heal", str(models["llama-k2"]), "--teacher", str(models["llama"]),
              "--data", str(models["data"]), "--steps", "4", "--seq-len", "32", "--eval-sequences", "8", "--lr", "3e-3"]
    _launch(*common, "--batch-size", "4", "-o", str(tmp_path / "one"))
    _launch(*common, "--batch-size", "2", "-o", str(tmp_path / "ddp"), processes=2)
    _launch(*common, "--batch-size", "2", "--fsdp", "-o", str(tmp_path / "fsdp"), processes=2)
    one, start = tensors(tmp_path / "one"), tensors(models["llama-k2"])
    moved = [k for k in one if not torch.equal(one[k], start[k])]
    assert moved
    for run_name, fsdp in (("ddp", False), ("fsdp", True)):
        record = json.loads((tmp_path / run_name / "heal.json").read_text())
        assert record["processes"] == 2 and record["fsdp"] is fsdp
        assert record["tensors"] == sorted(moved)
        total = sum(t.numel() for t in start.values()) + record["trainable_parameters"]  # the model and its LoRA
        if fsdp:  # half of every weight, give or take the padding of an odd first dimension
            assert abs(record["held_parameters"] - total / 2) < 0.01 * total, (record["held_parameters"], total)
        else:
            assert record["held_parameters"] is None
        two = tensors(tmp_path / run_name)
        assert all(torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-4) for k in one), run_name


@pytest.mark.parametrize("family", ["llama", "qwen2", "llada", "dream"])
def test_a_model_built_without_weights_is_the_loaded_one_on_the_meta_device(models, family):
    """What the processes of a sharded heal other than the main one build to receive their
    shares: the loaded model's parameters (names, shapes, dtype asked for) and buffers (names,
    shapes, dtypes as loading leaves them), with nothing in memory."""
    from repskip.engine.model import open_model
    from repskip.train.shard import builds_empty, empty_like_loaded

    handle = open_model(models[family])
    assert builds_empty(handle.family)
    for dtype in ("float32", "bfloat16"):
        loaded = handle.load(dtype=dtype)
        empty = empty_like_loaded(handle.family, handle.ckpt.config, getattr(torch, dtype))
        assert type(empty) is type(loaded)
        assert all(p.device.type == "meta" for p in empty.parameters())
        for kind in ("named_parameters", "named_buffers"):
            shapes = {n: (t.shape, t.dtype) for n, t in getattr(loaded, kind)()}
            assert shapes and {n: (t.shape, t.dtype) for n, t in getattr(empty, kind)()} == shapes, (kind, dtype)


FSDP_DRIVER = """
import sys
from repskip.train.heal import HealSettings, heal
student, teacher, data, out, fsdp, stop = sys.argv[1:7]
def stop_at(step):
    if step == int(stop):
        raise SystemExit(3)
heal(student, out, data=data, teacher=teacher, fsdp=fsdp == "fsdp", save_every=2, on_step=stop_at,
     settings=HealSettings(method="full", steps=5, lr=3e-3, grad_accum=2, seq_len=32, batch_size=int(sys.argv[7]),
                           eval_sequences=8))
"""


# slow: as above, with FSDP
@pytest.mark.slow
def test_a_sharded_full_fine_tuning_killed_resumes_to_the_weights_of_one_process(models, tmp_path):
    """--fsdp with --method full: the state saved at step 2 (each process's share of the
    weights and the optimiser's moments gathered whole), the run stopped at step 3 and rerun
    from it, ends where one process ends."""
    import os
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(FSDP_DRIVER)
    given = [str(models["llama-k2"]), str(models["llama"]), str(models["data"])]
    _launch(str(driver), *given, str(tmp_path / "one"), "-", "0", "4")
    out = tmp_path / "sharded"
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(driver), *given, str(out), "fsdp", "3", "2"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0 and not out.exists() and (state_folder(out) / "state.safetensors").is_file()
    _launch(str(driver), *given, str(out), "fsdp", "0", "2", processes=2)
    record = json.loads((out / "heal.json").read_text())
    assert record["resumed_from"] == 2 and record["fsdp"] is True and not state_folder(out).exists()
    one, sharded, start = tensors(tmp_path / "one"), tensors(out), tensors(models["llama-k2"])
    assert sorted(k for k in one if not torch.equal(one[k], start[k])) == record["tensors"]
    # The two runs sum the gradients in different orders, which moves a weight by a few 1e-6 on
    # some CPUs; a resume that lost the optimiser's moments or a step would move it by about
    # the learning rate (3e-3).
    assert all(torch.allclose(one[k], sharded[k], atol=1e-5, rtol=1e-4) for k in one)


def test_hub_datasets_are_read_through_the_datasets_library(models, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"body": ["first document " * 20, "", "second one " * 20]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(RepskipError, match="no 'text' column"):
        read_documents("hub:org/corpus:clean")
    docs, source = read_documents("hub:org/corpus:clean", "body")
    assert seen == {"name": "org/corpus", "config": "clean", "split": "train"}
    assert len(docs) == 2 and source == "hub:org/corpus:clean"


def test_bf16_autocast_trains_and_keeps_the_checkpoint_dtype(models, tmp_path):
    result = heal(models["llama-k2"], tmp_path / "bf16", data=str(models["data"]), teacher=models["llama"],
                  settings=HealSettings(steps=20, lr=3e-3, precision="bf16", **FAST), eval_every=20)
    ev = result.record["history"]["eval"]
    assert ev[-1]["kd"] < ev[0]["kd"]
    after = tensors(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in after.values())


def test_a_heal_killed_with_sigkill_resumes_to_the_same_weights(models, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "repskip", "heal", str(models["llama-k2"]), "--teacher", str(models["llama"]),
            "--data", str(models["data"]), "--steps", "150", "--seq-len", "32", "--eval-sequences", "8",
            "--save-every", "5", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    state = state_folder(out) / "state.safetensors"
    proc = subprocess.Popen([*args, "-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists()
    resumed = subprocess.run([*args, "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = json.loads((out / "heal.json").read_text())
    assert record["resumed_from"] and record["resumed_from"] % 5 == 0
    straight = subprocess.run([*args, "-o", str(tmp_path / "straight")], env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = tensors(out), tensors(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state_folder(out).exists() and not list(tmp_path.glob(".killed*"))


def test_a_folder_in_the_state_path_that_a_heal_did_not_make_is_never_used_or_removed(models, tmp_path):
    out = tmp_path / "out"
    blocked = state_folder(out)
    # another repskip output (a compressed model) where the state would go
    shutil.copytree(models["llama-k2"], blocked)
    before = {p.name: p.read_bytes() for p in blocked.iterdir() if p.is_file()}
    kw = dict(data=str(models["data"]), teacher=models["llama"], settings=HealSettings(steps=1, **FAST))
    with pytest.raises(RepskipError, match="not a heal's state folder"):
        heal(models["llama-k2"], out, **kw)
    # and the student itself at that path
    with pytest.raises(RepskipError, match="not a heal's state folder"):
        heal(blocked, out, data=str(models["data"]), settings=HealSettings(loss="lm", layers="all", steps=1, **FAST))
    assert {p.name: p.read_bytes() for p in blocked.iterdir() if p.is_file()} == before and not out.exists()
