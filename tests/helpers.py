"""Tiny random checkpoints in the exact on-disk layouts of real families, and a byte-level
tokenizer to go with them. Everything is built in the test's temporary folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Each family as its real checkpoints are laid out, shrunk: Qwen2 has q/k/v biases, GQA and
# layer_types; Llama (SmolLM2-style) ties the embeddings; Qwen3 has q/k norms and head_dim;
# Mistral has GQA and no biases.
FAMILIES = {
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, use_sliding_window=False, max_window_layers=6, rope_theta=1e6,
    ),
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, sliding_window=None,
    ),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_checkpoint(
    path: Path,
    family: str = "qwen2",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a random model of ``family`` with a tokenizer to ``path``; return ``path``."""
    torch.manual_seed(seed)
    spec = {**FAMILIES[family], **overrides}
    model_type = spec.pop("model_type")
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **spec,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Larger weights than the default init make every layer matter; norm weights away
        # from 1 make a norm more than a rescaling (cosine ignores a uniform scale).
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.02)
    model = model.to(dtype)  # drawn in fp32 first: the same seed gives the same weights in any dtype
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return Path(path)


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


# --- diffusion layouts made from autoregressive weights --------------------------------
MASK_ID = 300


def llada_from_llama(llama: Path, out: Path, mask_id: int = MASK_ID) -> Path:
    """A checkpoint in LLaDA's exact layout (config keys, tensor names, 2 shards + index)
    holding an untied Llama model's weights, with a stand-in for the shipped modeling code."""
    from repskip_diffusion.convert import llada_from_llama as convert

    convert(llama, out, mask_id, shards=2)
    (out / "modeling_llada.py").write_text("# stand-in for the authors' modeling code; never executed\n")
    return out


def dream_from_qwen2(qwen2: Path, out: Path, mask_id: int = MASK_ID) -> Path:
    """A checkpoint in Dream's layout (Qwen2 tensor names, Dream config) from Qwen2 weights."""
    import json
    import shutil

    shutil.copytree(qwen2, out)
    cfg = json.loads((out / "config.json").read_text())
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    for key in ("layer_types", "rope_parameters", "max_window_layers", "use_sliding_window", "sliding_window"):
        cfg.pop(key, None)
    cfg.update(model_type="Dream", architectures=["DreamModel"], rope_theta=theta, mask_token_id=mask_id,
               auto_map={"AutoModel": "modeling_dream.DreamModel"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "modeling_dream.py").write_text("# stand-in for the authors' modeling code; never executed\n")
    return out


def fake_install(site: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]]) -> Path:
    """Write the .dist-info a pip install would write: what importlib.metadata reads."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


# --- damaging a checkpoint, for the consistency checks ---------------------------------
def edit_safetensors(file: Path, edit) -> None:
    """Rewrite one safetensors file with ``edit(tensors)`` applied to its name -> tensor dict
    (drop, add or replace tensors), keeping the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


def edit_config(folder: Path, **changes) -> None:
    """Change keys of a checkpoint's config.json (a value of None removes the key)."""
    import json

    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), symlinks as their targets."""
    import os

    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"<dir>"
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as a JSON-lines file."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line(excinfo) -> str:
    """The message of a raised error, checked to be one line."""
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def close_tree(a, b, path: str = "", rel: float = 1e-5) -> None:
    """Equal JSON-like structure, every float within a relative ``rel`` of the other."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            close_tree(a[key], b[key], f"{path}.{key}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close_tree(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), (path, a, b)
    else:
        assert a == b, path


def one_line_error(res, message):
    """A CLI result that failed with exit 1 and exactly one line, ``error: ...message...``."""
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr


def calibration_loss(model, batches, objective) -> float:
    """The mean calibration loss of ``model`` (an objective's own, on the batches a maker gives)."""
    total = count = 0
    with torch.inference_mode():
        for index, (ids, mask) in enumerate(batches()):
            for p in objective.passes(ids, mask, index):
                loss, n = objective.loss(objective.logits(model, p), p)
                total, count = total + loss, count + n
    return total / count


def pruned_copy(handle, model, removed, maps=None):
    """A copy of a loaded ``model`` with ``removed`` really removed, its repair ``maps`` folded first."""
    import copy

    from repskip.repair.fit import fold_in_memory

    out = copy.deepcopy(model)
    if maps:
        fold_in_memory(out, handle.family, maps)
    handle.family.remove_layers(out, [i for i in range(handle.num_layers) if i not in removed])
    return out
