"""A Llama-layout checkpoint's weights in LLaDA's on-disk layout.

LLaDA's blocks are Llama's (RMSNorm, SwiGLU, rotary attention) with bidirectional attention,
so the same tensors under LLaDA's names make a masked-diffusion model of the same
architecture: the starting point of a study that trains the two from identical weights
(bench/ar_vs_diffusion.py), and of the tests' LLaDA checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from .llada import LLaDAFamily

LLAMA_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llada_name(llama_name: str) -> str:
    """The LLaDA on-disk name of a Llama tensor."""
    family = LLaDAFamily()
    if llama_name in LLAMA_TOP:
        return family.disk_name(LLAMA_TOP[llama_name])
    _, _, i, rest = llama_name.split(".", 3)
    return family.disk_name(f"blocks.{i}.{LLAMA_LAYER[rest]}")


def llada_config(llama: dict, mask_token_id: int) -> dict:
    """LLaDA's config.json keys for the architecture a Llama config.json describes."""
    theta = llama.get("rope_theta") or (llama.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada", "block_type": "llama", "n_layers": llama["num_hidden_layers"],
        "d_model": llama["hidden_size"], "n_heads": llama["num_attention_heads"],
        "n_kv_heads": llama.get("num_key_value_heads", llama["num_attention_heads"]),
        "mlp_hidden_size": llama["intermediate_size"], "activation_type": "silu",
        "vocab_size": llama["vocab_size"], "embedding_size": llama["vocab_size"], "rope": True,
        "rope_theta": theta, "layer_norm_type": "rms", "rms_norm_eps": llama["rms_norm_eps"],
        "include_bias": False, "weight_tying": False, "max_sequence_length": llama["max_position_embeddings"],
        "mask_token_id": mask_token_id, "eos_token_id": llama.get("eos_token_id"),
        "pad_token_id": llama.get("pad_token_id"), "use_cache": False, "block_group_size": 1,
    }


def llada_from_llama(llama: Path, out: Path, mask_token_id: int, shards: int = 1) -> Path:
    """Write ``llama``'s weights (one model.safetensors) into the new folder ``out`` in LLaDA's
    layout: LLaDA's tensor names and config keys, ``shards`` files with an index when more
    than one, the tokenizer files copied. LLaDA never ties its output head, so a tied Llama
    gets its embedding as a separate head."""
    from safetensors.torch import load_file, save_file

    llama, out = Path(llama), Path(out)
    cfg = json.loads((llama / "config.json").read_text("utf-8"))
    source = load_file(llama / "model.safetensors")
    source.setdefault("lm_head.weight", source["model.embed_tokens.weight"].clone())
    tensors = {llada_name(k): v.contiguous() for k, v in source.items()}
    out.mkdir(parents=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        size = -(-len(names) // shards)
        weight_map = {}
        for idx in range(shards):
            file = f"model-{idx + 1:05d}-of-{shards:05d}.safetensors"
            chunk = names[idx * size:(idx + 1) * size]
            save_file({n: tensors[n] for n in chunk}, out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in chunk})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(llada_config(cfg, mask_token_id), indent=2))
    for name in TOKENIZER_FILES:
        if (llama / name).is_file():
            (out / name).write_bytes((llama / name).read_bytes())
    return out
