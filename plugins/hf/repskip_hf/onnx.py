"""The module a transformers decoder is exported through: flat past key/values in, flat
present key/values out, so the graph has Optimum's inputs and outputs."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from repskip.runtime import cache_kwarg


class CausalLMWithPast(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):  # an empty past (length 0) gives an empty cache layer
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{cache_kwarg(self.model): cache})
        present = []
        for layer in cache.layers[: self.num_layers]:  # the cache was filled in place
            present += [layer.keys, layer.values]
        return (out.logits, *present)
