"""A Llama-style decoder with bidirectional attention: the block math of LLaDA and Dream.

RMSNorm computed in fp32, RoPE in the rotate-half convention, SwiGLU MLP, grouped-query
attention. Attention is bidirectional and honours a 2-D padding mask; positions follow the
mask (cumsum - 1), so a left-padded row gets the same logits as the prompt alone. ``causal``
forces a causal mask, which makes the model an ordinary Llama / Qwen2 decoder: the
correctness check against transformers that needs no foreign code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from repskip.checkpoint import open_checkpoint
from repskip.errors import RepskipError
from safetensors import safe_open
from torch import nn

from .spec import DecoderSpec


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden, q_width, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden, kv_width, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden, kv_width, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_width, spec.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        s = self.spec
        q = self.q_proj(x).view(B, T, s.heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if s.kv_heads != s.heads:
            k = k.repeat_interleave(s.heads // s.kv_heads, dim=1)
            v = v.repeat_interleave(s.heads // s.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, s.heads * s.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False)
        self.up_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False)
        self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.attn_norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.attn = Attention(spec)
        self.mlp_norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class BidirectionalDecoder(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.hidden, spec.vocab, bias=False)
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal: bool = False,
        head_window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. ``attention_mask`` is the usual 2-D 1 = token, 0 = padding.
        ``head_window=(start, end)`` runs the LM head on those positions only (a sampler
        reads no other logits; the head is a large share of a small model's forward)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        mask = keep[:, None, None, :].expand(B, 1, T, T)
        if causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        # A padding query that may attend to nothing would give NaN; let it see itself.
        mask = mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        x = self.embed(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        if head_window is not None:
            x = x[:, head_window[0] : head_window[1]]
        x = self.norm(x)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)


def load_decoder(
    path: Path,
    spec: DecoderSpec,
    disk_name: Callable[[str], str],
    dtype: torch.dtype | None,
    device: str,
    offload_folder: Path | None = None,
) -> BidirectionalDecoder:
    """Build the decoder and fill it from safetensors, mapping each parameter to its tensor.

    Every parameter must be found and every tensor on disk used: a layout mismatch is an
    error, never a half-loaded model. With ``offload_folder``, the blocks' weights stay in the
    checkpoint's files and accelerate reads each block's as it runs (see layerwise_device_map).
    """
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = BidirectionalDecoder(spec)
    wanted = {name: disk_name(name) for name, _ in model.named_parameters()}
    missing = [d for d in wanted.values() if d not in ckpt.tensors]
    if missing:
        raise RepskipError(f"{path}: tensor {missing[0]} is missing ({len(missing)} in all); the checkpoint does not match its config")
    unused = sorted(set(ckpt.tensors) - set(wanted.values()))
    if unused:
        raise RepskipError(f"{path}: tensor {unused[0]} is not part of the model ({len(unused)} in all); the checkpoint does not match its config")
    state = {}
    index: dict[str, dict] = {}
    by_file: dict[Path, list[str]] = {}
    for name, disk in wanted.items():
        by_file.setdefault(ckpt.tensors[disk].file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                if offload_folder is not None and name.startswith("blocks."):
                    index[name] = {"safetensors_file": str(file), "weight_name": wanted[name]}
                    if dtype is not None:
                        index[name]["dtype"] = str(dtype).replace("torch.", "")
                    continue
                t = f.get_tensor(wanted[name])
                state[name] = t.to(dtype) if dtype is not None else t
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
    if offload_folder is None:
        return model.to(device).eval()
    from accelerate import dispatch_model

    return dispatch_model(model, layerwise_device_map(spec, device), main_device=device,
                          offload_dir=str(offload_folder), offload_index=index).eval()


def layerwise_device_map(spec: DecoderSpec, device: str) -> dict[str, str]:
    """Every block on "disk" (read from the checkpoint as it runs), the embeddings, final norm
    and head on ``device`` (a tied head reads the embedding's weight without calling it)."""
    return {"embed": device, "norm": device, **({} if spec.tie_embeddings else {"lm_head": device}),
            **{f"blocks.{i}": "disk" for i in range(spec.layers)}}


class ExportForward(nn.Module):
    """The decoder's forward as ONNX export sees it: ids and padding mask in, every
    position's logits out (no head window: the graph serves any window)."""

    def __init__(self, decoder: BidirectionalDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, attention_mask)
