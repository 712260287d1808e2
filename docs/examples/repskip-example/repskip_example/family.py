"""GPT-2: layers at transformer.h.{i}, fused q/k/v projection, a two-matrix GELU MLP."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from repskip.family import Family
from repskip.flops import DecoderGeometry


class GPT2Family(Family):
    supports = "gpt2 (GPT-2, DistilGPT-2)"
    generative_kind = "autoregressive"
    default_sampler = "ar"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "gpt2"

    def num_layers(self, config: dict) -> int:
        return int(config["n_layer"])

    def layer_prefix(self, config: dict) -> str:
        return "transformer.h."

    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        return {**config, "n_layer": len(kept)}

    def geometry(self, config: dict) -> DecoderGeometry:
        hidden, heads = int(config["n_embd"]), int(config["n_head"])
        return DecoderGeometry(
            hidden=hidden,
            heads=heads,
            kv_heads=heads,
            head_dim=hidden // heads,
            intermediate=int(config.get("n_inner") or 4 * hidden),
            vocab=int(config["vocab_size"]),
            layers=int(config["n_layer"]),
            mlp_matrices=2,  # c_fc and c_proj, no gate
        )

    def load(self, path: Path, dtype: Any = None, device: str = "cpu", device_map: str | None = None) -> Any:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(str(path), dtype=dtype or "auto", use_safetensors=True,
                                                device_map=device_map)
        return (model if device_map else model.to(device)).eval()

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))

    def decoder_layers(self, model: Any) -> torch.nn.ModuleList:
        return model.transformer.h

    def remove_layers(self, model: Any, kept: Sequence[int]) -> None:
        layers = model.transformer.h
        model.transformer.h = torch.nn.ModuleList(layers[i] for i in kept)
        for new_idx, block in enumerate(model.transformer.h):
            block.attn.layer_idx = new_idx  # the KV cache is indexed by it
        model.config.n_layer = len(kept)
