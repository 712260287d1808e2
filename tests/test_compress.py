import json

import pytest
import torch
from safetensors import safe_open

from helpers import load, make_checkpoint
from repskip.compress import files as compress_mod
from repskip.errors import RepskipError
from repskip.pipeline import compress, open_model
from repskip.recipe import Recipe, Resolved


def resolved(remove, **extra) -> Recipe:
    return Recipe(resolved=Resolved(remove=remove, **extra))


def in_memory(path, kept):
    handle = open_model(path)
    model = load(path)
    handle.family.remove_layers(model, kept)
    return model


PROMPT = torch.tensor([[5, 80, 81, 82, 90, 100, 120, 7, 64, 65, 66, 67]])


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "mistral"])
def test_compressed_checkpoint_matches_in_memory_removal_and_generates_with_cache(tiny, tmp_path, family):
    out = tmp_path / "out"
    result, _ = compress(tiny[family], resolved([1, 4]), out)
    assert result.removed == [1, 4] and result.kept == [0, 2, 3, 5]

    reloaded = load(out)  # plain transformers, no repskip involved
    assert reloaded.config.num_hidden_layers == 4
    assert len(reloaded.model.layers) == 4
    expected = in_memory(tiny[family], [0, 2, 3, 5])
    with torch.no_grad():
        got = reloaded(PROMPT).logits
        want = expected(PROMPT).logits
    assert torch.equal(got, want)
    # and removal really changed the model
    with torch.no_grad():
        base = load(tiny[family])(PROMPT).logits
    assert not torch.allclose(base, got)

    with torch.no_grad():
        cached = reloaded.generate(PROMPT, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = reloaded.generate(PROMPT, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_tensors_are_renamed_contiguously_and_bytes_kept(tiny, tmp_path):
    out = tmp_path / "out"
    compress(tiny["qwen2"], resolved([0, 3]), out)
    with safe_open(out / "model.safetensors", "pt") as new, safe_open(tiny["qwen2"] / "model.safetensors", "pt") as old:
        names = set(new.keys())
        layer_ids = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
        assert layer_ids == [0, 1, 2, 3]
        for new_idx, old_idx in enumerate([1, 2, 4, 5]):
            for suffix in ("self_attn.q_proj.bias", "mlp.down_proj.weight", "input_layernorm.weight"):
                a = new.get_tensor(f"model.layers.{new_idx}.{suffix}")
                b = old.get_tensor(f"model.layers.{old_idx}.{suffix}")
                assert torch.equal(a, b)
        assert torch.equal(new.get_tensor("lm_head.weight"), old.get_tensor("lm_head.weight"))
        assert len(names) == len(set(old.keys())) - 2 * 12  # Qwen2: 12 tensors per layer


def test_config_and_side_files(tiny, tmp_path):
    out = tmp_path / "out"
    compress(tiny["qwen2"], resolved([2]), out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert len(config["layer_types"]) == 5
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny["qwen2"] / name).read_bytes()
    recipe_text = (out / "repskip-recipe.yaml").read_text()
    assert "remove:" in recipe_text and "- 2" in recipe_text
    assert f"torch: {torch.__version__}" in recipe_text  # stamped even when written by hand


def test_sliding_window_layer_types_and_max_window_layers_follow_the_kept_layers(tmp_path):
    src = make_checkpoint(tmp_path / "sw", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=3)
    before = json.loads((src / "config.json").read_text())
    assert before["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 3
    out = tmp_path / "out"
    compress(src, resolved([1, 4]), out)
    after = json.loads((out / "config.json").read_text())
    assert after["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert after["max_window_layers"] == 2
    ids = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(load(out)(ids).logits, in_memory(src, [0, 2, 3, 5])(ids).logits)


def test_multi_shard_input_and_size_capped_output(tiny_sharded, tmp_path):
    out = tmp_path / "out"
    result, _ = compress(tiny_sharded, resolved([2, 3]), out, max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert result.shards == len(files) > 1
    sizes = [(out / f).stat().st_size for f in files]
    biggest_tensor = max(e.nbytes for e in open_model(tiny_sharded).ckpt.tensors.values())
    assert max(sizes) <= 100_000 + biggest_tensor + 4096
    assert index["metadata"]["total_size"] == result.bytes_out
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(load(out)(ids).logits, in_memory(tiny_sharded, [0, 1, 4, 5])(ids).logits)


def test_dtype_is_preserved(tmp_path):
    src = make_checkpoint(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    compress(src, resolved([3]), out)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert load(out).dtype == torch.bfloat16


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RepskipError, match="already exists; pass --force"):
        compress(tiny["llama"], resolved([1]), out)
    # --force replaces only what repskip wrote: a folder of the user's files stays
    with pytest.raises(RepskipError, match="repskip did not write"):
        compress(tiny["llama"], resolved([1]), out, force=True)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    mine = tmp_path / "mine"
    compress(tiny["llama"], resolved([1]), mine)
    compress(tiny["llama"], resolved([1, 2]), mine, force=True)
    assert json.loads((mine / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_write_that_fails_midway_leaves_nothing(tiny_sharded, tmp_path, monkeypatch):
    real = compress_mod._write_shard
    calls = []

    def failing(path, items, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, items, metadata)

    monkeypatch.setattr(compress_mod, "_write_shard", failing)
    out = tmp_path / "out"
    with pytest.raises(RepskipError, match="No space left on device.*nothing was written"):
        compress(tiny_sharded, resolved([1]), out, max_shard_size=100_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


@pytest.mark.parametrize(
    "remove, message",
    [
        ([6], "out of range: the model has 6 layers"),
        ([-1], "out of range"),
        ([1, 1], "listed more than once"),
        ([0, 1, 2, 3, 4, 5], "removes all 6 layers"),
    ],
)
def test_bad_layer_lists_are_refused(tiny, tmp_path, remove, message):
    with pytest.raises(RepskipError, match=message):
        compress(tiny["llama"], resolved(remove), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_for_another_model_is_refused(tiny, tmp_path):
    other = open_model(tiny["qwen2"]).ckpt.fingerprint()
    recipe = Recipe(resolved=Resolved(remove=[1], num_layers=6, model={"fingerprint": other, "family": "hf-decoder"}))
    with pytest.raises(RepskipError, match="made for a different model"):
        compress(tiny["llama"], recipe, tmp_path / "out")


def test_parse_size():
    assert compress_mod.parse_size("2GB") == 2_000_000_000
    assert compress_mod.parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert compress_mod.parse_size("500MB") == 500_000_000
    with pytest.raises(RepskipError, match="cannot read size"):
        compress_mod.parse_size("lots")


def _sparse_checkpoint(folder, config: dict):
    """A checkpoint of ``config``'s exact layout whose weights are all zero, written as a
    sparse file: gigabytes on paper, no time and no disk to make."""
    import json
    import struct

    from repskip_hf.layout import layout

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in sorted(layout(config).saved.items()):
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


# slow: two 384 MB checkpoints compressed in fresh processes; the file-to-file copy itself is in
# the default suite (test_copy_falls_back_to_reads_where_the_kernel_copy_is_refused and the others)
@pytest.mark.slow
def test_compress_reads_no_weights_into_memory(tmp_path):
    """The layout comes from a model built on the meta device and the tensors are copied file
    to file: the process's peak memory does not grow with the checkpoint. Measured as the
    difference between a 2-layer and an 8-layer checkpoint of the same shapes, so the cost of
    importing torch and transformers (about 300-450 MB, by machine) cancels out."""
    import subprocess
    import sys

    from transformers import AutoConfig

    script = ("import sys\nfrom repskip.cli import main\n"
              "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
              "finally:\n    print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n")
    peaks, sizes = {}, {}
    for layers, remove in ((2, "[1]"), (8, "[1, 5]")):
        config = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                                      num_attention_heads=8, vocab_size=32000).to_dict()
        src, out = tmp_path / f"big{layers}", tmp_path / f"out{layers}"
        sizes[layers] = _sparse_checkpoint(src, config)
        recipe = tmp_path / f"r{layers}.yaml"
        recipe.write_text(f"schema_version: 1\nresolved: {{remove: {remove}}}\n")
        for args in (["compress", src, "--recipe", recipe, "-o", out], ["flops", src, "--recipe", recipe]):
            done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr
            peaks[args[0], layers] = int(done.stdout.split()[-1]) / 1024
        assert (out / "model.safetensors").stat().st_size < sizes[layers]
    grown_mb = (sizes[8] - sizes[2]) / 2**20  # six layers, 384 MB
    for command in ("compress", "flops"):
        assert peaks[command, 8] - peaks[command, 2] < 0.15 * grown_mb, (command, peaks, grown_mb)


def test_copy_falls_back_to_reads_where_the_kernel_copy_is_refused(tiny, tmp_path, monkeypatch):
    import errno
    import os

    calls = []

    def refuse_after_first(src, dst, count, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.EXDEV, "cross-device")
        return real(src, dst, min(count, 100), offset)  # copy a little, then refuse

    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", refuse_after_first)
    out = tmp_path / "out"
    compress(tiny["llama"], resolved([2]), out)
    monkeypatch.undo()
    expected = tmp_path / "expected"
    compress(tiny["llama"], resolved([2]), expected)
    assert (out / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()


def test_a_small_rewritten_tensor_before_a_kernel_copy_keeps_its_place(tiny, tmp_path):
    """New bytes written from Python (a folded bias, a healed norm) sit in a buffer; the kernel
    copy of the next tensor writes at the file's own offset. Each tensor must land where the
    header says, whatever its size."""
    from repskip.checkpoint import open_checkpoint
    from repskip.compress.files import attach_data, plan_tensors, write_checkpoint

    ckpt = open_checkpoint(tiny["qwen2"])
    planned = plan_tensors(ckpt, "model.layers.", list(range(6)), 6)
    small = [p.name for p in planned[:-1] if p.source.nbytes < 1024]  # followed by a copied tensor
    assert small
    new = {name: (bytes(range(256)) * 4)[: ckpt.tensors[name].nbytes] for name in small}
    write_checkpoint(ckpt, attach_data(planned, new), dict(ckpt.config), tmp_path / "out", {})
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as out, \
            safe_open(str(tiny["qwen2"] / "model.safetensors"), "pt") as src:
        for name in out.keys():
            want = new[name] if name in new else src.get_tensor(name).numpy().tobytes()
            assert out.get_tensor(name).numpy().tobytes() == want, name


def test_the_default_models_tokenizer_names_a_class_transformers_4_knows(tiny, tmp_path):
    """transformers 5 saves a GGUF's tokenizer as class TokenizersBackend, which transformers 4
    refuses; the default model's cache names GPT2Tokenizer (as SmolLM2's Hub files do), which
    gives the same tokens, and holds the chat template in tokenizer_config.json as well (checked
    by hand: transformers 4.46.3 then loads the compressed default model's tokenizer, with the
    same ids and chat text). A source's tokenizer files are copied as they are."""
    import shutil

    from transformers import AutoTokenizer

    from repskip.default_model import PORTABLE_CLASS, V5_ONLY_CLASS, portable_tokenizer_config

    folder = tmp_path / "cache"
    shutil.copytree(tiny["llama"], folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = V5_ONLY_CLASS
    path.write_text(json.dumps(config))
    before = AutoTokenizer.from_pretrained(folder)
    portable_tokenizer_config(folder)
    template = (folder / "chat_template.jinja").read_text()  # also where transformers 4.46 reads it
    assert json.loads(path.read_text()) == {**config, "tokenizer_class": PORTABLE_CLASS, "chat_template": template}
    after = AutoTokenizer.from_pretrained(folder)
    text = "The quick brown fox, twice: the quick brown fox."
    assert after(text).input_ids == before(text).input_ids and after.get_vocab() == before.get_vocab()
    chat = [{"role": "user", "content": "hi"}]
    assert after.apply_chat_template(chat, tokenize=False) == before.apply_chat_template(chat, tokenize=False)
    # another class is left alone, and compress copies the source's files byte for byte
    config["tokenizer_class"] = "LlamaTokenizer"
    path.write_text(json.dumps(config))
    portable_tokenizer_config(folder)
    assert json.loads(path.read_text())["tokenizer_class"] == "LlamaTokenizer"
    compress(folder, Recipe(resolved=Resolved(remove=[1])), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == path.read_bytes()
