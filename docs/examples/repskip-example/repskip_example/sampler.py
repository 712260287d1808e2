"""A greedy decoder written as a plain loop with a KV cache: the smallest useful sampler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from repskip.runtime import cache_kwarg, output_cache
from repskip.sampler import Generation, Sampler, count_forwards


class GreedyLoopSampler(Sampler):
    generative_kind = "autoregressive"
    defaults = {"max_new_tokens": 32}

    @torch.inference_mode()
    def generate(self, model: Any, tokenizer: Any, prompts: Sequence[str], *, family: Any = None, seed: int = 0, **overrides: Any) -> Generation:
        cfg = self.settings(overrides)
        texts, all_ids = [], []
        with count_forwards(model) as calls:
            for prompt in prompts:  # one at a time: no padding to get right
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                out = model(input_ids=ids, use_cache=True)
                new: list[int] = []
                while True:
                    token = int(out.logits[0, -1].argmax())
                    if token == tokenizer.eos_token_id:
                        break
                    new.append(token)
                    if len(new) == cfg["max_new_tokens"]:
                        break  # no forward for a token nobody will read
                    out = model(input_ids=torch.tensor([[token]]), use_cache=True,
                                **{cache_kwarg(model): output_cache(out)})  # the cache's name by version
                all_ids.append(new)
                texts.append(tokenizer.decode(new))
        return Generation(texts, all_ids, calls[0], cfg)
