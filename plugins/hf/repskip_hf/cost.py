"""Per-layer analytic cost of any transformers decoder, read off its meta-device modules.

Every linear map a token passes through costs its weight's size in multiply-accumulates: a
``torch.nn.Linear``, transformers' GPT-2 ``Conv1D``, a depthwise ``Conv1d`` (a state-space
mixer's short convolution). Routed experts count by the share of them a token goes through
(top-k of n); a shared expert and the router count in full. Softmax attention adds its
score and value products over the context (repskip.flops). Weights read elementwise (norms,
biases, a state-space decay) are left out, as the FLOP counter leaves them out.
"""

from __future__ import annotations

import re
from typing import Any

from repskip.flops import LayerCost, ModelCost

# the layer's children by what they compute, for naming the component
ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
MLP = re.compile(r"mlp|feed_forward|ffn|moe|block_sparse", re.IGNORECASE)
# attention modules whose cost grows linearly with the context (no score matrix)
LINEAR_ATTENTION = re.compile(r"linear|delta|lightning|mamba|conv|recurrent|retention|ssm|mixer", re.IGNORECASE)
# config attributes holding how many routed experts a token goes through
TOP_K = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_activated_experts", "experts_per_token",
         "n_activated_experts")


def _component(path: str) -> str:
    first = path.split(".", 1)[0]
    if ATTENTION.search(first) and not LINEAR_ATTENTION.search(first):
        return "attention"
    if MLP.search(first):
        return "experts" if ".experts" in f".{path}" else "mlp"
    return "mixer"


def _top_k(config: Any) -> int | None:
    for key in TOP_K:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _weight_macs(layer: Any, config: Any) -> dict[str, int]:
    import torch

    macs: dict[str, int] = {}
    top_k = _top_k(config)

    def add(path: str, amount: float) -> None:
        name = _component(path)
        macs[name] = macs.get(name, 0) + int(round(amount))

    for path, module in layer.named_modules():
        in_experts = ".experts" in f".{path}" and ".shared" not in f".{path}"
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) or (
                type(module).__name__ == "Conv1D" and hasattr(module, "nf")):
            if in_experts and isinstance(_parent_list(layer, path), torch.nn.ModuleList):
                experts = len(_parent_list(layer, path))
                add(path, module.weight.numel() * min(top_k or experts, experts) / experts)
            else:
                add(path, module.weight.numel())
        elif path.rsplit(".", 1)[-1] == "experts" or path.endswith(".experts"):
            for name, param in module.named_parameters(recurse=False):
                if param.dim() == 3 and not name.endswith("bias"):  # fused experts [n, out, in]
                    experts = param.shape[0]
                    add(f"{path}.{name}", param.numel() * min(top_k or experts, experts) / experts)
    return macs


def _parent_list(layer: Any, path: str) -> Any:
    """The ModuleList an expert's linear map sits in (experts.3.down_proj -> experts)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut - 1] == "experts":
            module = layer
            for part in parts[:cut]:
                module = getattr(module, part)
            return module
    return None


def _attention(layer: Any, config: Any) -> tuple[int, int, int | None]:
    """(score width, value width, window) of the layer's softmax attention, summed over heads."""
    heads = getattr(config, "num_attention_heads", None)
    for path, module in layer.named_modules():
        name = type(module).__name__
        if not name.endswith("Attention") or LINEAR_ATTENTION.search(name) or not path:
            continue
        settings = vars(module)
        n = settings.get("num_heads") or settings.get("num_attention_heads") or heads
        qk = settings.get("qk_head_dim") or settings.get("head_dim") or settings.get("head_size")
        v = settings.get("v_head_dim") or qk
        if not (isinstance(n, int) and isinstance(qk, int)):
            continue
        window = settings.get("sliding_window")
        return n * qk, n * int(v), window if isinstance(window, int) and window > 0 else None
    return 0, 0, None


def model_cost(model: Any, layers: Any) -> ModelCost:
    """The cost of ``model`` (a meta-device causal LM) whose decoder layers are ``layers``."""
    config = model.config
    out = []
    for layer in layers:
        score, value, window = _attention(layer, config)
        out.append(LayerCost(macs=_weight_macs(layer, config), score_width=score, value_width=value, window=window))
    head = model.get_output_embeddings()
    head_macs = int(head.weight.numel()) if head is not None else 0
    return ModelCost(tuple(out), head_macs)
