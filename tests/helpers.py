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
# layer_types; Llama (SmolLM2-style) ties the embeddings; Qwen3 has q/k norms and head_dim.
FAMILIES = {
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, use_sliding_window=False, max_window_layers=6, rope_theta=1e6,
    ),
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=False,
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
    model = AutoModelForCausalLM.from_config(config).to(dtype)
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
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return Path(path)


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()
