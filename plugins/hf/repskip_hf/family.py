"""Family plugin for transformers-native decoders whose layers live at ``model.layers``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repskip.family import Dim, Family, slice_layer_config
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

# What transformers' config class of each model_type uses when config.json leaves a key out
# (num_key_value_heads null always means one KV head per query head).
DEFAULT_KV_HEADS = {"mistral": 8, "qwen2": 32, "qwen3": 32}  # llama: num_attention_heads
DEFAULT_HEAD_DIM = {"qwen3": 128}  # the others: hidden_size / num_attention_heads
# Which optional biases each model_type's modeling code reads from config.json; qwen2 always
# has q/k/v biases and mistral never has any, whatever the config says.
READS_ATTENTION_BIAS = {"llama", "qwen3"}
READS_MLP_BIAS = {"llama"}


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

    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]] | None:
        """The tensors transformers' modeling code of this model_type builds from config.json.

        None for a quantized checkpoint: its tensor names and shapes are the quantizer's."""
        if config.get("quantization_config"):
            return None
        model_type = config.get("model_type")
        vocab = Dim(config["vocab_size"], "vocab_size")
        hidden = Dim(config["hidden_size"], "hidden_size")
        inter = Dim(config["intermediate_size"], "intermediate_size")
        heads = int(config["num_attention_heads"])
        if "num_key_value_heads" in config:
            kv_heads, kv_key = config["num_key_value_heads"] or heads, "num_key_value_heads"
        else:
            kv_heads, kv_key = DEFAULT_KV_HEADS.get(model_type, heads), "num_key_value_heads (default)"
        if config.get("head_dim"):
            head_dim, hd_key = int(config["head_dim"]), "head_dim"
        elif model_type in DEFAULT_HEAD_DIM and "head_dim" not in config:
            head_dim, hd_key = DEFAULT_HEAD_DIM[model_type], "head_dim (default)"
        else:
            head_dim, hd_key = int(hidden) // heads, "hidden_size/num_attention_heads"
        q = Dim(heads * head_dim, f"num_attention_heads*{hd_key}")
        kv = Dim(int(kv_heads) * head_dim, f"{kv_key}*{hd_key}")
        qkv_bias = model_type == "qwen2" or (model_type in READS_ATTENTION_BIAS and bool(config.get("attention_bias")))
        o_bias = model_type in READS_ATTENTION_BIAS and bool(config.get("attention_bias"))
        mlp_bias = model_type in READS_MLP_BIAS and bool(config.get("mlp_bias"))

        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
        for i in range(self.num_layers(config)):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (hidden,)
            out[p + "post_attention_layernorm.weight"] = (hidden,)
            for name, width in (("q", q), ("k", kv), ("v", kv)):
                out[p + f"self_attn.{name}_proj.weight"] = (width, hidden)
                if qkv_bias:
                    out[p + f"self_attn.{name}_proj.bias"] = (width,)
            out[p + "self_attn.o_proj.weight"] = (hidden, q)
            if o_bias:
                out[p + "self_attn.o_proj.bias"] = (hidden,)
            if model_type == "qwen3":
                out[p + "self_attn.q_norm.weight"] = (Dim(head_dim, hd_key),)
                out[p + "self_attn.k_norm.weight"] = (Dim(head_dim, hd_key),)
            out[p + "mlp.gate_proj.weight"] = (inter, hidden)
            out[p + "mlp.up_proj.weight"] = (inter, hidden)
            out[p + "mlp.down_proj.weight"] = (hidden, inter)
            if mlp_bias:
                out[p + "mlp.gate_proj.bias"] = (inter,)
                out[p + "mlp.up_proj.bias"] = (inter,)
                out[p + "mlp.down_proj.bias"] = (hidden,)
        out["model.norm.weight"] = (hidden,)
        if not config.get("tie_word_embeddings", False):
            out["lm_head.weight"] = (vocab, hidden)
        return out

    def optional_tensors(self, config: dict) -> dict[str, tuple[int, ...] | None]:
        """A tied lm_head saved anyway (transformers ties it to the embeddings on load) and
        the rotary inv_freq buffers older saves hold (recomputed, never read)."""
        out: dict[str, tuple[int, ...] | None] = {"model.rotary_emb.inv_freq": None}
        for i in range(self.num_layers(config)):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = None
        if config.get("tie_word_embeddings", False):
            out["lm_head.weight"] = (Dim(config["vocab_size"], "vocab_size"), Dim(config["hidden_size"], "hidden_size"))
        return out

    def mlp_output_projection(self, layer: Any) -> Any:
        return layer.mlp.down_proj

    def mlp_output_tensor(self, config: dict, index: int) -> str:
        return f"model.layers.{index}.mlp.down_proj.weight"

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
