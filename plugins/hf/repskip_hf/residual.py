"""Where a decoder layer writes its MLP branch into the residual stream, for the linear repair.

A repair map T multiplies the MLP branch's output m. It folds into weights exactly when m is
a sum of linear maps' outputs (plus their biases) that joins the residual stream as it is:
T then distributes over the sum, into every term's output projection: the dense MLP's down
projection (down_proj, c_proj, fc2, dense_4h_to_h, w2), each routed expert's down projection
(the routing weights scale each term and commute with T) and a shared expert's. A norm on m
before it joins the stream (Gemma 2/3's post-feedforward norm) breaks that: no fold is exact,
and the repair is refused, saying why. The fit itself checks on the real model that m joins
the stream as it is (repskip.repair.fit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# the layer's child that computes the MLP branch
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn", "mlp_block")
# the linear map that writes a dense MLP's output
OUTPUT_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out", "wo", "output_linear", "out_proj")
# the expert containers of a mixture of experts, and the always-active shared expert(s)
EXPERT_NAMES = ("experts",)
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "shared_experts_mlp")
# a norm applied to the MLP branch before the residual add
POST_NORM = re.compile(r"post_(feedforward|ff|mlp|moe|ffn)|ffn_post|post_ffw|mlp_post", re.IGNORECASE)


@dataclass(frozen=True)
class Writer:
    """One parameter of the MLP branch's output side: the map folds along ``axis`` (its
    output, hidden-sized axis)."""

    name: str  # relative to the layer
    axis: int


def _linear_axis(module: Any) -> tuple[int, int] | None:
    """The output axis of a linear module's weight and of its bias: torch Linear [out, in],
    transformers' GPT-2 Conv1D [in, out]."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return 0, 0
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 1, 0
    return None


def _dense_writers(prefix: str, block: Any) -> list[Writer] | None:
    for name in OUTPUT_NAMES:
        child = getattr(block, name, None)
        axes = _linear_axis(child) if child is not None else None
        if axes is None:
            continue
        out = [Writer(f"{prefix}{name}.weight", axes[0])]
        if getattr(child, "bias", None) is not None:
            out.append(Writer(f"{prefix}{name}.bias", axes[1]))
        return out
    return None


def _expert_writers(prefix: str, experts: Any) -> list[Writer] | None:
    import torch

    if isinstance(experts, torch.nn.ModuleList):  # one module per expert
        out: list[Writer] = []
        for i, expert in enumerate(experts):
            found = _dense_writers(f"{prefix}{i}.", expert)
            if found is None:
                return None
            out += found
        return out
    if getattr(experts, "has_post_expert_norm", False):
        return None
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.nn.Parameter) or down.dim() != 3:
        return None
    # transformers' fused experts: [experts, out, in], or [experts, in, out] when transposed
    # (is_transposed; Llama 4's experts are [experts, in, out] without saying so: their hidden
    # size tells the axes apart where the two sizes differ)
    axis = 2 if getattr(experts, "is_transposed", False) else 1
    hidden = getattr(experts, "hidden_size", None)
    if isinstance(hidden, int) and down.shape[1] != down.shape[2] and hidden in down.shape[1:]:
        axis = 1 + list(down.shape[1:]).index(hidden)
    out = [Writer(f"{prefix}down_proj", axis)]
    if isinstance(getattr(experts, "down_proj_bias", None), torch.nn.Parameter):
        out.append(Writer(f"{prefix}down_proj_bias", 1))
    return out


def hook_point(layer: Any) -> Any | None:
    """The module whose output is the MLP branch, as it joins the residual stream: the MLP block,
    unless the block adds the residual itself (BLOOM's and MPT's take it as an argument), in
    which case its output projection."""
    import inspect

    found = mlp_block(layer)
    ws = writers(layer)
    if found is None or not ws:
        return None
    block = found[1]
    if block is not layer and "residual" not in inspect.signature(block.forward).parameters:
        return block
    names = {w.name.rsplit(".", 1)[0] for w in ws}
    if len(names) != 1:
        return None
    return layer.get_submodule(names.pop())


def mlp_block(layer: Any) -> tuple[str, Any] | None:
    """(name, module) of the layer's MLP; ("", the layer) where the layer holds the MLP's linear
    maps itself (OPT, XGLM, BioGPT: fc1 and fc2)."""
    for name in MLP_NAMES:
        block = getattr(layer, name, None)
        if block is not None:
            return name, block
    if _dense_writers("", layer) is not None:
        return "", layer
    return None


def problem(layer: Any) -> str | None:
    """Why no repair map folds exactly into this layer's weights; None when one does."""
    found = mlp_block(layer)
    if found is None:
        return "its layers have no MLP the repair knows (an mlp, feed_forward or block_sparse_moe block, or fc1/fc2)"
    for name, child in layer.named_children():
        if POST_NORM.search(name) and "norm" in type(child).__name__.lower():
            return (f"its MLP output passes through a norm ({name}) before it joins the residual stream, "
                    "so no map folded into a weight is exact")
    return None if writers(layer) else "its MLP block has no output projection the repair knows"


def writers(layer: Any) -> list[Writer] | None:
    """Every parameter that writes the MLP branch's output, or None when the block is not a
    sum of linear outputs the repair can fold into."""
    found = mlp_block(layer)
    if found is None:
        return None
    name, block = found
    prefix = f"{name}." if name else ""
    if _linear_axis(block) is not None:  # the branch is one linear map
        axes = _linear_axis(block)
        return [Writer(f"{name}.weight", axes[0])] + ([Writer(f"{name}.bias", axes[1])] if block.bias is not None else [])
    out = _dense_writers(prefix, block)
    if out is not None:
        return out
    experts = next(((n, getattr(block, n)) for n in EXPERT_NAMES if getattr(block, n, None) is not None), None)
    if experts is None:
        return None
    routed = _expert_writers(f"{prefix}{experts[0]}.", experts[1])
    if routed is None:
        return None
    for shared_name in SHARED_NAMES:
        shared = getattr(block, shared_name, None)
        if shared is not None:
            more = _dense_writers(f"{prefix}{shared_name}.", shared)
            if more is None:
                return None
            routed += more
    return routed
