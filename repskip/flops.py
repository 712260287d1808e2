"""Analytic FLOPs of a decoder forward pass, by component.

A multiply-accumulate counts as 2 FLOPs. Matrix products only: norms, activations, RoPE and
softmax are elementwise and left out, as torch.utils.flop_counter also leaves them out.
Attention scores and values are counted over the full query x key rectangle, as dense
kernels compute it (a causal mask does not halve the work of a dense kernel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

COMPONENTS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "attn_scores", "attn_values", "mlp", "lm_head",
)


@dataclass(frozen=True)
class DecoderGeometry:
    """The shapes that decide a decoder's compute. Families build one from their config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    mlp_matrices: int = 3  # gate, up, down (SwiGLU); 2 for a plain two-matrix MLP


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


def forward_flops(
    geo: DecoderGeometry,
    tokens: int,
    context: int | None = None,
    layers: int | None = None,
    logits_tokens: int | None = None,
) -> Flops:
    """FLOPs of one forward over ``tokens`` new positions attending to ``context`` positions.

    ``context`` defaults to ``tokens`` (a prefill, or a diffusion step over the whole
    sequence); a decode step with a KV cache is ``tokens=1, context=past+1``. ``layers``
    defaults to the geometry's count; pass the kept count for a pruned model.
    ``logits_tokens`` is how many positions get logits (all of them unless told).
    """
    context = tokens if context is None else context
    layers = geo.layers if layers is None else layers
    logits_tokens = tokens if logits_tokens is None else logits_tokens
    q_width = geo.heads * geo.head_dim
    kv_width = geo.kv_heads * geo.head_dim
    per_layer = {
        "q_proj": 2 * tokens * geo.hidden * q_width,
        "k_proj": 2 * tokens * geo.hidden * kv_width,
        "v_proj": 2 * tokens * geo.hidden * kv_width,
        "o_proj": 2 * tokens * q_width * geo.hidden,
        "attn_scores": 2 * tokens * context * q_width,
        "attn_values": 2 * tokens * context * q_width,
        "mlp": 2 * tokens * geo.hidden * geo.intermediate * geo.mlp_matrices,
    }
    components = {name: layers * value for name, value in per_layer.items()}
    components["lm_head"] = 2 * logits_tokens * geo.hidden * geo.vocab
    return Flops(components, layers, tokens, context)


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


def compare(geo: DecoderGeometry, removed: int, seq_len: int) -> FlopsComparison:
    """FLOPs of base and pruned for a ``seq_len``-token forward and one decode step after it."""
    kept = geo.layers - removed
    return FlopsComparison(
        base=forward_flops(geo, seq_len),
        pruned=forward_flops(geo, seq_len, layers=kept),
        decode_base=forward_flops(geo, 1, context=seq_len + 1),
        decode_pruned=forward_flops(geo, 1, context=seq_len + 1, layers=kept),
        removed=removed,
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
    geo: DecoderGeometry,
    kind: str,
    prompt_len: int,
    gen_len: int,
    *,
    steps: int | None = None,
    cfg: bool = False,
    layers: int | None = None,
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
