"""The module a transformers decoder is exported through: flat past key/values in, flat
present key/values out, so the graph has Optimum's inputs and outputs."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from repskip.errors import RepskipError
from repskip.runtime import cache_kwarg


class CausalLMWithPast(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        if getattr(model.config, "_experts_implementation", None) not in (None, "eager", "batched_mm"):
            # routed experts as batched matrix products: the grouped kernel is a custom op
            # torch.onnx cannot translate
            model.set_experts_implementation("batched_mm")

    @torch.no_grad()
    def kv_shapes(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per layer, the (heads, head dim) of its cached keys and of its values, as one
        cached step of the model fills them (multi-head latent attention caches keys and
        values of different widths)."""
        cache = DynamicCache()
        ids = torch.zeros(1, 1, dtype=torch.long, device=next(self.model.parameters()).device)
        try:
            self.model(input_ids=ids, use_cache=True, **{cache_kwarg(self.model): cache})
            layers = cache.layers[: self.num_layers]
            plain = len(layers) == self.num_layers and all(getattr(layer, "keys", None) is not None for layer in layers)
        except (IndexError, AttributeError, ValueError, TypeError):  # the model wants a cache of its own kind
            plain = False
        if not plain:
            raise RepskipError(
                f"the ONNX export carries a key and value cache per layer; this {self.model.config.model_type} "
                "model's layers keep a cache of another kind (a state-space or linear-attention state, an indexer's "
                "keys), which the causal-lm-with-past signature cannot hold: export is not supported for it")
        return [((layer.keys.shape[1], layer.keys.shape[3]), (layer.values.shape[1], layer.values.shape[3]))
                for layer in layers]

    def forward(self, input_ids, attention_mask, position_ids, past):
        # every layer keeps its whole past (a sliding-window layer's own cache would trim it,
        # and the graph's outputs would change length by layer); the sliding layers' masks
        # still see only their window
        cache = DynamicCache()
        for i in range(self.num_layers):  # an empty past (length 0) gives an empty cache layer
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{cache_kwarg(self.model): cache})
        present = []
        for layer in cache.layers[: self.num_layers]:  # the cache was filled in place
            present += [layer.keys, layer.values]
        return (out.logits, *present)
