"""The shapes of the bidirectional decoder: a plain dataclass, so that reading a config (and
compressing files) needs no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the embedding and of the LM head
    layers: int
    rms_eps: float
    rope_theta: float
    qkv_bias: bool = False
    tie_embeddings: bool = False
