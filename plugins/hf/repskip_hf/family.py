"""Family plugin for transformers-native decoders whose layers live at ``model.layers``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repskip.family import Family, slice_layer_config
from repskip.flops import DecoderGeometry, hf_geometry

# model_type -> what the family was tested on. Each shares the model.layers.{i} layout,
# per-layer self_attn.layer_idx, and a SwiGLU MLP with gate/up/down projections.
MODEL_TYPES = {
    "llama": "Llama, SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
}

# Config keys holding one entry per layer: sliced to the kept layers on removal.
PER_LAYER_KEYS = ("layer_types",)


class HFDecoderFamily(Family):
    supports = ", ".join(f"{t} ({names})" for t, names in MODEL_TYPES.items())
    generative_kind = "autoregressive"
    default_sampler = "ar"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in MODEL_TYPES

    def num_layers(self, config: dict) -> int:
        return int(config["num_hidden_layers"])

    def layer_prefix(self, config: dict) -> str:
        return "model.layers."

    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        return slice_layer_config(config, kept, "num_hidden_layers", PER_LAYER_KEYS)

    def geometry(self, config: dict) -> DecoderGeometry:
        return hf_geometry(config)

    def load(self, path: Path, dtype: Any = None, device: str = "cpu", device_map: str | None = None) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=False,
            use_safetensors=True,
            device_map=device_map,  # accelerate places the layers across devices
        )
        return (model if device_map else model.to(device)).eval()

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)

    def decoder_layers(self, model: Any) -> Any:
        return model.model.layers

    def remove_layers(self, model: Any, kept: Sequence[int]) -> None:
        import torch  # here, not at the top: working on files must not need torch

        layers = self.decoder_layers(model)
        model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
        # The KV cache is indexed by layer_idx: a stale index corrupts generation.
        for new_idx, layer in enumerate(model.model.layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        new = self.rewrite_config(model.config.to_dict(), kept)
        for key in ("num_hidden_layers", "max_window_layers", *PER_LAYER_KEYS):
            if key in new:
                setattr(model.config, key, new[key])

    def onnx_module(self, model: Any) -> Any:
        from .onnx import CausalLMWithPast

        return CausalLMWithPast(model)
