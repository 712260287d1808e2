"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): a diffusion LM initialised from Qwen2.5.

Qwen2 tensor names and geometry, bidirectional attention, and SHIFTED logits inherited from
the autoregressive initialisation: logits[:, i] predicts token i+1, so every consumer
realigns them (token_logits) before reading the prediction for position i.
"""

from __future__ import annotations

from collections.abc import Sequence

from repskip.family import slice_layer_config
from repskip.flops import hf_geometry

from .family import DiffusionFamily, rope_theta
from .spec import DecoderSpec


class DreamFamily(DiffusionFamily):
    model_type = "Dream"
    supports = "Dream (Dream-v0-Base-7B/-Instruct-7B)"
    default_sampler = "dream"
    shifted_logits = True
    top_names = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    layer_names = {
        "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        **{f"attn.{p}_proj.{t}": f"model.layers.{{i}}.self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")},
        "attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        **{f"mlp.{p}_proj.weight": f"model.layers.{{i}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    }

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "Dream"

    def num_layers(self, config: dict) -> int:
        return int(config["num_hidden_layers"])

    def layer_prefix(self, config: dict) -> str:
        return "model.layers."

    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        return slice_layer_config(config, kept, "num_hidden_layers")

    def spec_sources(self, config: dict) -> dict[str, str]:
        return {
            "hidden": "hidden_size",
            "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads" if config.get("num_key_value_heads") else "num_attention_heads",
            "head_dim": "head_dim" if config.get("head_dim") else "(hidden_size/num_attention_heads)",
            "intermediate": "intermediate_size",
            "vocab": "vocab_size",
        }

    def spec(self, config: dict) -> DecoderSpec:
        geo = hf_geometry(config)  # Qwen2's keys
        return DecoderSpec(
            hidden=geo.hidden,
            heads=geo.heads,
            kv_heads=geo.kv_heads,
            head_dim=geo.head_dim,
            intermediate=geo.intermediate,
            vocab=geo.vocab,
            layers=geo.layers,
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta(config),
            qkv_bias=True,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
