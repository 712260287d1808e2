"""Analytic FLOPs of a decoder forward pass, by component.

A multiply-accumulate counts as 2 FLOPs. Matrix products only: norms, activations, RoPE and
softmax are elementwise and left out, as torch.utils.flop_counter also leaves them out.
Attention scores and values are counted over the full query x key rectangle, as dense
kernels compute it (a causal mask does not halve the work of a dense kernel); a decode step
of a sliding-window layer reads only the window its cache keeps.

A model's cost is per layer (``ModelCost``), since layers differ: dense and mixture-of-experts
MLPs (whose experts count by the share a token routes through), attention and state-space
mixers, sliding and global attention. Removing layers removes their own cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerCost:
    """What one decoder layer computes per token: multiply-accumulates of its weights by
    component, and the softmax attention it runs over the context (query-key width and
    value width summed over heads; 0 for a layer without one)."""

    macs: Mapping[str, int]
    score_width: int = 0
    value_width: int = 0
    window: int | None = None  # a sliding window: a cached decode step attends to at most this many positions


@dataclass(frozen=True)
class ModelCost:
    """Per-layer costs and the LM head's multiply-accumulates per position with logits."""

    layers: tuple[LayerCost, ...]
    head_macs: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def keep(self, kept: Sequence[int]) -> ModelCost:
        """The cost of the model that keeps only layers ``kept``."""
        return ModelCost(tuple(self.layers[i] for i in kept), self.head_macs)

    def kept(self, layers: int | Sequence[int] | None) -> list[int]:
        """Layer indices for ``layers``: all (None), the kept indices, or a count, which names
        layers only where every layer costs the same."""
        if layers is None:
            return list(range(len(self.layers)))
        if isinstance(layers, int):
            if any(layer != self.layers[0] for layer in self.layers):
                raise ValueError("this model's layers differ in cost: pass the kept layer indices, not a count")
            return list(range(layers))
        return list(layers)


@dataclass(frozen=True)
class DecoderGeometry:
    """The shapes of a decoder whose layers are all alike (Llama-style): one way to build a
    ModelCost."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    mlp_matrices: int = 3  # gate, up, down (SwiGLU); 2 for a plain two-matrix MLP

    def cost(self) -> ModelCost:
        q_width = self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        layer = LayerCost(
            macs={"q_proj": self.hidden * q_width, "k_proj": self.hidden * kv_width, "v_proj": self.hidden * kv_width,
                  "o_proj": q_width * self.hidden, "mlp": self.hidden * self.intermediate * self.mlp_matrices},
            score_width=q_width, value_width=q_width)
        return ModelCost((layer,) * self.layers, self.hidden * self.vocab)


def hf_geometry(config: dict) -> DecoderGeometry:
    """The geometry under transformers' usual config keys (Llama, Qwen2, Mistral, Dream, ...)."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return DecoderGeometry(
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        layers=int(config["num_hidden_layers"]),
    )


@dataclass(frozen=True)
class Flops:
    """FLOPs of one forward pass, split by component (totals over all layers)."""

    components: dict[str, int]
    layers: int
    tokens: int
    context: int

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total"] = self.total
        return out


def _as_cost(cost: ModelCost | DecoderGeometry) -> ModelCost:
    return cost.cost() if isinstance(cost, DecoderGeometry) else cost


def forward_flops(
    cost: ModelCost | DecoderGeometry,
    tokens: int,
    context: int | None = None,
    layers: int | Sequence[int] | None = None,
    logits_tokens: int | None = None,
) -> Flops:
    """FLOPs of one forward over ``tokens`` new positions attending to ``context`` positions.

    ``context`` defaults to ``tokens`` (a prefill, or a diffusion step over the whole
    sequence); a decode step with a KV cache is ``tokens=1, context=past+1``. ``layers``: the
    kept layer indices of a pruned model (all by default; a count where all layers are
    alike). ``logits_tokens`` is how many positions get logits (all of them unless told).
    """
    cost = _as_cost(cost)
    context = tokens if context is None else context
    kept = cost.kept(layers)
    logits_tokens = tokens if logits_tokens is None else logits_tokens
    components: dict[str, int] = {}
    for index in kept:
        layer = cost.layers[index]
        for name, macs in layer.macs.items():
            components[name] = components.get(name, 0) + 2 * tokens * macs
        if layer.score_width or layer.value_width:
            # a cached decode step of a sliding layer reads only the window its cache keeps
            span = min(context, layer.window) if layer.window and tokens == 1 else context
            components["attn_scores"] = components.get("attn_scores", 0) + 2 * tokens * span * layer.score_width
            components["attn_values"] = components.get("attn_values", 0) + 2 * tokens * span * layer.value_width
    components["lm_head"] = 2 * logits_tokens * cost.head_macs
    return Flops(components, len(kept), tokens, context)


@dataclass(frozen=True)
class FlopsComparison:
    """Base against pruned: the paper's layer fraction and the exact figures."""

    base: Flops
    pruned: Flops
    decode_base: Flops
    decode_pruned: Flops
    removed: int

    @property
    def layer_fraction(self) -> float:
        """The paper's figure: skipped layers / layers (embedding and LM head ignored)."""
        return self.removed / self.base.layers

    @property
    def forward_reduction(self) -> float:
        return 1 - self.pruned.total / self.base.total

    @property
    def decode_reduction(self) -> float:
        return 1 - self.decode_pruned.total / self.decode_base.total

    def to_dict(self) -> dict:
        return {
            "removed_layers": self.removed,
            "layers": self.base.layers,
            "layer_fraction": self.layer_fraction,
            "forward": {
                "tokens": self.base.tokens,
                "base": self.base.to_dict(),
                "pruned": self.pruned.to_dict(),
                "reduction": self.forward_reduction,
            },
            "decode_token": {
                "context": self.decode_base.context,
                "base": self.decode_base.to_dict(),
                "pruned": self.decode_pruned.to_dict(),
                "reduction": self.decode_reduction,
            },
        }


def compare(cost: ModelCost | DecoderGeometry, removed: int | Sequence[int], seq_len: int) -> FlopsComparison:
    """FLOPs of base and pruned for a ``seq_len``-token forward and one decode step after it;
    ``removed``: the removed layer indices (a count where all layers are alike)."""
    cost = _as_cost(cost)
    if isinstance(removed, int):
        kept: int | list[int] = cost.num_layers - removed
        count = removed
    else:
        gone = set(removed)
        kept = [i for i in range(cost.num_layers) if i not in gone]
        count = len(gone)
    return FlopsComparison(
        base=forward_flops(cost, seq_len),
        pruned=forward_flops(cost, seq_len, layers=kept),
        decode_base=forward_flops(cost, 1, context=seq_len + 1),
        decode_pruned=forward_flops(cost, 1, context=seq_len + 1, layers=kept),
        removed=count,
    )


@dataclass(frozen=True)
class GenerationFlops:
    """FLOPs to generate ``gen_len`` tokens after a ``prompt_len``-token prompt."""

    kind: str
    prompt_len: int
    gen_len: int
    forward_passes: int
    total: int

    @property
    def per_generated_token(self) -> float:
        return self.total / self.gen_len

    def to_dict(self) -> dict:
        return {**asdict(self), "per_generated_token": self.per_generated_token}


def generation_flops(
    geo: ModelCost | DecoderGeometry,
    kind: str,
    prompt_len: int,
    gen_len: int,
    *,
    steps: int | None = None,
    cfg: bool = False,
    layers: int | Sequence[int] | None = None,
    logits_per_pass: int | None = None,
) -> GenerationFlops:
    """Autoregressive: one prefill of the prompt (logits for its last position only), then
    one cached decode step per further token. Diffusion: ``steps`` forward passes over the
    whole sequence (no KV cache), doubled in batch by classifier-free guidance, with logits
    for ``logits_per_pass`` positions (repskip's samplers compute the LM head only where a
    step can reveal: LLaDA's current block, Dream's generated region; default ``gen_len``).
    ``steps`` defaults to ``gen_len``, as the authors' samplers do."""
    if kind == "autoregressive":
        total = forward_flops(geo, prompt_len, layers=layers, logits_tokens=1).total
        for i in range(1, gen_len):
            total += forward_flops(geo, 1, context=prompt_len + i, layers=layers).total
        return GenerationFlops(kind, prompt_len, gen_len, gen_len, total)
    passes = gen_len if steps is None else steps
    per_pass = forward_flops(geo, prompt_len + gen_len, layers=layers,
                             logits_tokens=gen_len if logits_per_pass is None else logits_per_pass).total
    return GenerationFlops(kind, prompt_len, gen_len, passes, per_pass * passes * (2 if cfg else 1))
