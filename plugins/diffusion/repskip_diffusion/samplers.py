"""The LLaDA and Dream samplers, as their authors specify them.

Each algorithm is a plain function over ``denoise(x, attention_mask) -> logits`` with logits
aligned so that position i predicts token i (Dream's shift is undone by the family before
this point). That keeps the algorithms testable on a toy denoiser and independent of how the
model runs. Prompts are left-padded; every random draw comes from one seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from repskip.errors import RepskipError
from repskip.runtime import model_device
from repskip.sampler import Generation, Sampler, count_forwards

#: denoise(x, attention_mask, (start, end)) -> logits of positions start..end-1, aligned so
#: that position i predicts token i. Samplers ask only for the positions they read.
Denoise = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
StepHook = Callable[[dict], None]
NEG_INF = float("-inf")


# --- LLaDA: low-confidence remasking, semi-autoregressive blocks ------------------------------
def transfer_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to reveal at each step, per row: masked // steps, the remainder spread +1 over
    the first steps. ``masked`` is [B]; returns [B, steps] (long)."""
    base = masked // steps
    remainder = masked % steps
    schedule = base[:, None].expand(-1, steps).clone()
    schedule += (torch.arange(steps, device=masked.device)[None, :] < remainder[:, None]).long()
    return schedule


def gumbel_argmax_logits(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                         full_shape: tuple[int, ...] | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
    """The authors' Gumbel trick in float64: exp(logits) / (-log U) ** temperature. With
    ``full_shape`` and ``window``, U is drawn for the whole sequence and the window's slice
    used, so a seed gives the same tokens as the authors' whole-sequence draw."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(full_shape or logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    if window is not None:
        noise = noise[:, window[0] : window[1]]
    return logits.exp() / (-torch.log(noise)) ** temperature


def _window_start(mask_index: torch.Tensor, start: int, end: int) -> int:
    """The first position before ``end`` that any row still has masked, or ``start``."""
    masked = mask_index[:, :start].any(0).nonzero()
    return int(masked[0]) if len(masked) else start


def llada_generate(
    denoise: Denoise,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    mask_id: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    eos_id: int | None = None,
    eot_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """x = [prompt | mask * gen_length], revealed block by block; returns x [B, P + G]."""
    if gen_length % block_length:
        raise RepskipError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise RepskipError(f"steps {steps} is not divisible by the number of blocks ({num_blocks})")
    if remasking not in ("low_confidence", "random"):
        raise RepskipError(f"remasking {remasking!r} is unknown; choose low_confidence or random")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    device = prompt.device
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    attention = torch.cat([prompt_mask.long(), torch.ones(B, gen_length, dtype=torch.long, device=device)], 1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :P] = prompt_mask.bool()
    for block in range(num_blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        schedule = transfer_schedule((x[:, start:end] == mask_id).sum(1), steps_per_block)
        for i in range(steps_per_block):
            mask_index = (x == mask_id) & attention.bool()  # padding is never generated
            # The authors give every position after the current block confidence -inf, so a
            # step can reveal only masked positions before the block's end: the block, and any
            # earlier position still holding the mask token (a model may predict it). Logits
            # are computed for that window alone: the same result for less work.
            lo = _window_start(mask_index, start, end)
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[prompt_index] = mask_id
                both = denoise(torch.cat([x, unconditional]), torch.cat([attention, attention]), (lo, end))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = denoise(x, attention, (lo, end))
            if logits_eos_inf and eos_id is not None:
                logits[:, :, eos_id] = NEG_INF
            noise_shape = (B, x.shape[1], logits.shape[-1])  # draws as for the whole sequence
            x0 = gumbel_argmax_logits(logits, temperature, generator, noise_shape, (lo, end)).argmax(-1)
            if confidence_eos_eot_inf:
                # The authors write `noised[..., EOS] = logits[..., EOT] = -inf`. At temperature 0
                # the noised logits are the logits themselves, so the confidence loses both
                # tokens; above 0 they are a new tensor and only EoT reaches the confidence.
                # Kept as they run it: it changes which positions a seed reveals.
                for tok in (eos_id, eot_id) if temperature == 0 else (eot_id,):
                    if tok is not None:
                        logits[:, :, tok] = NEG_INF
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                # float32, as the authors draw it: the same seed reveals the same positions
                x0_p = torch.rand(x.shape, device=device, generator=generator)[:, lo:end]
            window_masked = mask_index[:, lo:end]
            x0 = torch.where(window_masked, x0, x[:, lo:end])
            confidence = torch.where(window_masked, x0_p, torch.full_like(x0_p, NEG_INF))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(B):
                k = int(schedule[row, i])
                if k:
                    transfer[row, torch.topk(confidence[row], k).indices] = True
            x[:, lo:end][transfer] = x0[transfer]
            revealed = torch.zeros_like(x, dtype=torch.bool)
            revealed[:, lo:end] = transfer
            if on_step:
                on_step({"block": block, "step": i, "x": x, "revealed": revealed, "mask_index": mask_index,
                         "attention_mask": attention})
    return x


# --- Dream: diffusion_generate with origin / maskgit_plus / topk_margin / entropy -------------
def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    confidence: str = "maskgit_plus",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per row of ``logits`` [N, V]: temperature, then top_p, then top_k;
    argmax at temperature 0. Confidence is the token's probability (maskgit_plus), the
    top1 - top2 margin (topk_margin) or the negative entropy (entropy)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        conf = torch.gather(probs, -1, tokens[:, None]).squeeze(-1)
    else:
        conf, tokens = probs.max(-1)
    if confidence == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif confidence == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return conf, tokens


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def dream_generate(
    denoise: Denoise,
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    mask_id: int,
    max_new_tokens: int = 128,
    steps: int = 128,
    eps: float = 1e-3,
    alg: str = "entropy",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    if alg not in DREAM_ALGS:
        raise RepskipError(f"alg {alg!r} is unknown; choose one of {', '.join(DREAM_ALGS)}")
    if steps < 1:
        raise RepskipError("steps must be at least 1")
    B, P = prompt.shape
    device = prompt.device
    x = torch.full((B, P + max_new_tokens), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    attention = torch.cat([prompt_mask.long(), torch.ones(B, max_new_tokens, dtype=torch.long, device=device)], 1)
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    for i in range(steps):
        mask_index = (x == mask_id) & attention.bool()  # padding is never generated
        # logits only from the first masked position on: nothing before it is read
        lo = _window_start(mask_index, P, x.shape[1])
        mask_logits = denoise(x, attention, (lo, x.shape[1]))[mask_index[:, lo:]]
        t, s = timesteps[i], timesteps[i + 1]
        revealed = torch.zeros_like(mask_index)
        if alg == "origin":
            p_transfer = float(1 - s / t) if i < steps - 1 else 1.0
            x0 = torch.full_like(x[mask_index], mask_id)
            chosen = torch.rand(x0.shape, device=device, generator=generator) < p_transfer
            _, x0[chosen] = sample_tokens(mask_logits[chosen], temperature, top_p, top_k, generator=generator)
            revealed[mask_index] = chosen
            x[mask_index] = x0
        else:
            conf, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, confidence=alg, generator=generator)
            masked_per_row = mask_index.sum() / mask_index.shape[0]
            n = int(masked_per_row * (1 - s / t)) if i < steps - 1 else int(masked_per_row)
            full_conf = torch.full(x.shape, NEG_INF, dtype=conf.dtype, device=device)
            full_conf[mask_index] = conf
            if n > 0:
                if not alg_temp:
                    index = torch.topk(full_conf, n).indices
                else:
                    probs = F.softmax(full_conf / alg_temp, dim=-1)
                    index = torch.multinomial(probs, n, generator=generator)
                proposal = torch.full_like(x, mask_id)
                proposal[mask_index] = x0
                rows = torch.arange(B, device=device)[:, None].expand_as(index)
                x[rows, index] = proposal[rows, index]
                revealed[rows, index] = True
        if on_step:
            on_step({"block": 0, "step": i, "x": x, "revealed": revealed, "mask_index": mask_index,
                     "attention_mask": attention})
    return x


# --- the sampler plugins --------------------------------------------------------------------
def _left_pad(tokenizer: Any, prompts: Sequence[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = []
    for p in prompts:
        bos = tokenizer.bos_token
        rows.append(tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _stop_ids(tokenizer: Any, config: dict) -> set[int]:
    stops = set()
    for value in (config.get("eos_token_id"), tokenizer.eos_token_id):
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, list):
            stops.update(value)
    for special in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
        tok = tokenizer.convert_tokens_to_ids(special) if special in tokenizer.get_vocab() else None
        if isinstance(tok, int):
            stops.add(tok)
    return stops


class _DiffusionSampler(Sampler):
    generative_kind = "diffusion"
    length_key = "gen_length"

    def _run(self, denoise, ids, mask, mask_id, cfg, generator, family, tokenizer, config):
        raise NotImplementedError

    @torch.inference_mode()
    def generate(self, model, tokenizer, prompts, *, family=None, seed=0, **overrides) -> Generation:
        if family is None or not hasattr(family, "token_logits"):
            raise RepskipError(f"the {type(self).__name__} needs a diffusion family (LLaDA or Dream)")
        cfg = self.settings(overrides)
        config = getattr(model, "repskip_config", None) or {}
        mask_id = family.mask_token_id(config)
        # never pad with the mask token: padding would look like positions to fill
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, config.get("pad_token_id"), 0)
                       if isinstance(t, int) and t != mask_id), 0 if mask_id else 1)
        ids, mask = _left_pad(tokenizer, prompts, pad_id)
        device = model_device(model)
        ids, mask = ids.to(device), mask.to(device)
        context = family.context_length(config)
        total = ids.shape[1] + cfg[self.length_key]
        if context and total > context:
            raise RepskipError(
                f"prompt ({ids.shape[1]} tokens) plus {self.length_key} ({cfg[self.length_key]}) is {total} "
                f"tokens, longer than the model's context ({context}); shorten the prompt or the generation"
            )
        generator = torch.Generator(device=device).manual_seed(seed)
        denoise = lambda x, m, window: family.token_logits(model, x, m, window)  # noqa: E731
        with count_forwards(model) as calls:
            x = self._run(denoise, ids, mask, mask_id, cfg, generator, family, tokenizer, config)
        stops = _stop_ids(tokenizer, config) | {mask_id}
        texts, out_ids = [], []
        for row in x[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out_ids.append(row[:cut])
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        return Generation(texts, out_ids, calls[0], cfg)


class LLaDASampler(_DiffusionSampler):
    length_key = "gen_length"
    defaults = {
        "steps": 128, "gen_length": 128, "block_length": 32, "temperature": 0.0, "cfg_scale": 0.0,
        "remasking": "low_confidence", "logits_eos_inf": False, "confidence_eos_eot_inf": False,
    }

    def _run(self, denoise, ids, mask, mask_id, cfg, generator, family, tokenizer, config):
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() else None
        eos = config.get("eos_token_id") if isinstance(config.get("eos_token_id"), int) else tokenizer.eos_token_id
        return llada_generate(denoise, ids, mask, mask_id=mask_id, eos_id=eos, eot_id=eot, generator=generator, **cfg)


class DreamSampler(_DiffusionSampler):
    length_key = "max_new_tokens"
    defaults = {
        "max_new_tokens": 128, "steps": 128, "eps": 1e-3, "alg": "entropy", "alg_temp": None,
        "temperature": 0.0, "top_p": None, "top_k": None,
    }

    def _run(self, denoise, ids, mask, mask_id, cfg, generator, family, tokenizer, config):
        return dream_generate(denoise, ids, mask, mask_id=mask_id, generator=generator, **cfg)
