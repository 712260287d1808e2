"""Autoregressive sampler: greedy or temperature/top-p/top-k, with stop strings.

A transformers model runs through its own ``generate``. A model without one (an exported
ONNX graph on ONNX Runtime, repskip.runtime.OrtCausalLM) runs through :func:`decode`, an
incremental loop over its KV cache that makes the same choices: left padding, positions
counted over the attention mask, transformers' own logits warpers and stop-string check.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from repskip.errors import RepskipError
from repskip.runtime import model_device, output_cache
from repskip.sampler import Generation, Sampler, count_forwards
from transformers import (
    LogitsProcessorList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class ARSampler(Sampler):
    generative_kind = "autoregressive"
    defaults = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "batch_size": 8, "stop": ()}

    @torch.inference_mode()
    def generate(
        self, model: Any, tokenizer: Any, prompts: Sequence[str], *, family: Any = None, seed: int = 0, **overrides: Any
    ) -> Generation:
        cfg = self.settings(overrides)
        torch.manual_seed(seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = model_device(model)
        sampling = cfg["temperature"] > 0
        kwargs = dict(max_new_tokens=cfg["max_new_tokens"], do_sample=sampling, pad_token_id=pad_id)
        if cfg["stop"]:  # stop each row once its text holds one of these strings
            kwargs.update(stop_strings=list(cfg["stop"]), tokenizer=tokenizer)
        if sampling:
            kwargs.update(temperature=cfg["temperature"], top_p=cfg["top_p"], top_k=cfg["top_k"] or None)
        texts, ids_out = [], []
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues from the right edge
        try:
            with count_forwards(model) as calls:
                for start in range(0, len(prompts), cfg["batch_size"]):
                    chunk = list(prompts[start : start + cfg["batch_size"]])
                    # A chat-formatted prompt already starts with its special tokens.
                    bos = tokenizer.bos_token
                    special = not (bos and all(p.startswith(bos) for p in chunk))
                    enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special)
                    enc = {k: v.to(device) for k, v in enc.items()}
                    new_tokens = _fit_context(model, enc["input_ids"].shape[1], cfg["max_new_tokens"])
                    if hasattr(model, "generate"):
                        out = model.generate(**enc, **{**kwargs, "max_new_tokens": new_tokens})
                    else:
                        out = decode(model, enc["input_ids"], enc["attention_mask"], {**cfg, "max_new_tokens": new_tokens},
                                     pad_id, _eos_ids(tokenizer, model), tokenizer)
                    new = out[:, enc["input_ids"].shape[1] :]
                    stops = {pad_id, tokenizer.eos_token_id}
                    for row in new.tolist():
                        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                        row = row[:cut]  # generation stops at EOS, then pads
                        ids_out.append(row)
                        texts.append(tokenizer.decode(row, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = side
        return Generation(texts, ids_out, calls[0], cfg)


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    value = config.get("max_position_embeddings") if isinstance(config, dict) else getattr(
        config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _fit_context(model: Any, prompt_len: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, capped (with a warning) so that prompt and generation fit the
    model's context: past it a model degrades, and generation would run on for nothing."""
    context = _context_length(model)
    if context is None or prompt_len + max_new_tokens <= context:
        return max_new_tokens
    if prompt_len >= context:
        raise RepskipError(f"the prompt ({prompt_len} tokens) fills the model's context ({context} tokens); "
                           "shorten the prompt")
    warnings.warn(f"max_new_tokens {max_new_tokens} capped at {context - prompt_len}: the prompt ({prompt_len} "
                  f"tokens) and the generation must fit the model's context ({context} tokens)", stacklevel=3)
    return context - prompt_len


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """End-of-sequence ids as generate sees them: the config's (one or a list) and the tokenizer's."""
    ids = set()
    for source in (getattr(model, "config", None) or {}, getattr(model, "generation_settings", None) or {}):
        value = source.get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                ids.add(v)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: dict, pad_id: int,
           eos_ids: set[int], tokenizer: Any) -> torch.Tensor:
    """Prompt plus generated tokens [batch, prompt + new] from a model called as
    ``model(input_ids, attention_mask, position_ids, past_key_values)`` returning ``.logits``
    and ``.past_key_values``: one prefill, then one call per token on the cache."""
    sampling = cfg["temperature"] > 0
    warpers = LogitsProcessorList()
    if sampling:
        warpers.append(TemperatureLogitsWarper(cfg["temperature"]))
        if cfg["top_k"]:
            warpers.append(TopKLogitsWarper(cfg["top_k"]))
        if cfg["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(cfg["top_p"]))
    stop = StopStringCriteria(tokenizer, list(cfg["stop"])) if cfg["stop"] else None
    mask = attention_mask.long()
    # positions count real tokens only, so a left-padded row sees the same positions as alone
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    seq = input_ids
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    eos = torch.tensor(sorted(eos_ids), device=seq.device)
    out = model(input_ids, mask, positions, None)
    for step in range(cfg["max_new_tokens"]):
        scores = out.logits[:, -1].float()
        if sampling:
            probs = torch.softmax(warpers(seq, scores), dim=-1)
            token = torch.multinomial(probs, 1).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        seq = torch.cat([seq, token[:, None]], dim=1)
        done |= torch.isin(token, eos)
        if stop is not None:
            done |= stop(seq, scores)
        if bool(done.all()) or step == cfg["max_new_tokens"] - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(token[:, None], mask, positions, output_cache(out))
    return seq
