"""Autoregressive sampler over transformers' generate: greedy or temperature/top-p/top-k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from repskip.sampler import Generation, Sampler, count_forwards


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
        device = next(model.parameters()).device
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
                    out = model.generate(**enc, **kwargs)
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
