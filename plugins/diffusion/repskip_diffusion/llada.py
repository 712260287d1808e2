"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5): a native masked-diffusion LM.

The Hub checkpoints ship their own modeling code for old transformers; repskip loads the
weights into its own implementation instead and keeps the .py files when exporting, so the
exported folder still works with the authors' code. num_hidden_layers, hidden_size and
num_attention_heads are read-only aliases in LLaDA's config class: n_layers is the key.
"""

from __future__ import annotations

from collections.abc import Sequence

from repskip.family import slice_layer_config

from .family import DiffusionFamily, rope_theta
from .spec import DecoderSpec


class LLaDAFamily(DiffusionFamily):
    model_type = "llada"
    supports = "llada (LLaDA-8B-Base/-Instruct, LLaDA-1.5)"
    default_sampler = "llada"
    shifted_logits = False
    context_keys = ("max_sequence_length",)
    top_names = {
        "embed.weight": "model.transformer.wte.weight",
        "norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    }
    layer_names = {
        "attn_norm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
        "attn.q_proj.weight": "model.transformer.blocks.{i}.q_proj.weight",
        "attn.k_proj.weight": "model.transformer.blocks.{i}.k_proj.weight",
        "attn.v_proj.weight": "model.transformer.blocks.{i}.v_proj.weight",
        "attn.q_proj.bias": "model.transformer.blocks.{i}.q_proj.bias",
        "attn.k_proj.bias": "model.transformer.blocks.{i}.k_proj.bias",
        "attn.v_proj.bias": "model.transformer.blocks.{i}.v_proj.bias",
        "attn.o_proj.weight": "model.transformer.blocks.{i}.attn_out.weight",
        "mlp_norm.weight": "model.transformer.blocks.{i}.ff_norm.weight",
        "mlp.gate_proj.weight": "model.transformer.blocks.{i}.ff_proj.weight",
        "mlp.up_proj.weight": "model.transformer.blocks.{i}.up_proj.weight",
        "mlp.down_proj.weight": "model.transformer.blocks.{i}.ff_out.weight",
    }

    def matches(self, config: dict) -> bool:
        return str(config.get("model_type", "")).lower() == "llada"

    def num_layers(self, config: dict) -> int:
        return int(config["n_layers"])

    def layer_prefix(self, config: dict) -> str:
        return "model.transformer.blocks."

    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        return slice_layer_config(config, kept, "n_layers", ())

    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]] | None:
        if config.get("block_type", "llama") != "llama":
            return None  # another block layout; spec() refuses it when a model is loaded
        return super().expected_tensors(config)

    def spec_sources(self, config: dict) -> dict[str, str]:
        return {
            "hidden": "d_model",
            "heads": "n_heads",
            "kv_heads": "n_kv_heads" if config.get("n_kv_heads") else "n_heads",
            "head_dim": "(d_model/n_heads)",
            "intermediate": "mlp_hidden_size",
            "vocab": "embedding_size" if config.get("embedding_size") else "vocab_size",
        }

    def spec(self, config: dict) -> DecoderSpec:
        hidden, heads = int(config["d_model"]), int(config["n_heads"])
        if config.get("block_type", "llama") != "llama":
            from repskip.errors import RepskipError

            raise RepskipError(f"LLaDA block_type {config['block_type']!r} is not supported (only 'llama')")
        return DecoderSpec(
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("n_kv_heads") or heads),
            head_dim=hidden // heads,
            intermediate=int(config["mlp_hidden_size"]),
            vocab=int(config.get("embedding_size") or config["vocab_size"]),
            layers=int(config["n_layers"]),
            rms_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta(config),
            qkv_bias=bool(config.get("include_bias", False) or config.get("include_qkv_bias", False)),
            tie_embeddings=bool(config.get("weight_tying", False)),
        )
