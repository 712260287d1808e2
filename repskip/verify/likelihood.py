"""Negative log-likelihood of a text under a model: next-token for autoregressive models, the
masked-token estimate for masked-diffusion models. And the log-likelihood of a continuation
after a context (``continuation_logprobs``), which both the multiple-choice benchmarks of
``verify`` and the lm-eval adapter use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


@torch.inference_mode()
def autoregressive_nll(model: Any, family: Any, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(x_t | x_<t) over t >= 1 of one sequence [1, T], and the count."""
    logits = family.logits(model, ids, torch.ones_like(ids)).float()
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


@torch.inference_mode()
def masked_diffusion_nll(
    model: Any, family: Any, ids: torch.Tensor, mask_id: int, samples: int = 8, seed: int = 0
) -> tuple[float, int]:
    """The masked-diffusion bound on -log p(x) (LLaDA's evaluation): for mask ratios t
    stratified over (0, 1), mask each token with probability t and add
    (1/t) * sum over masked tokens of -log p(x_i | x_t); average over the samples.
    Returns the bound and the number of tokens, so that exp(bound / tokens) is a perplexity."""
    generator = torch.Generator().manual_seed(seed)
    T = ids.shape[1]
    total = 0.0
    for k in range(samples):
        t = (k + 0.5) / samples
        masked = torch.rand(T, generator=generator) < t
        if not masked.any():
            masked[torch.randint(T, (1,), generator=generator)] = True
        noisy = torch.where(masked[None, :].to(ids.device), torch.full_like(ids, mask_id), ids)
        logits = family.token_logits(model, noisy, torch.ones_like(ids)).float()
        nll = F.cross_entropy(logits[0, masked.to(ids.device)], ids[0, masked.to(ids.device)], reduction="sum")
        total += float(nll) / t
    return total / samples, T


# --- log-likelihoods of continuations (multiple-choice benchmarks, lm-eval's loglikelihood) -----
def _prefix_token_id(tokenizer: Any) -> int:
    """What stands for an empty context (lm-eval's ``prefix_token_id``): BOS, else EOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The tokens of ``context`` and of ``continuation`` after it, as lm-evaluation-harness's
    Hugging Face model makes them (``HFLM.tok_encode`` and ``TemplateLM._encode_pair``, 0.4.x).

    - Whitespace at the end of the context moves to the start of the continuation.
    - Context and continuation are encoded as a whole; the continuation's tokens are the
      whole's tokens past the length of the context's own encoding. A token that spans the
      boundary is thus scored with the continuation, and nothing is scored twice.
    - Special tokens: both encodings use the tokenizer's default (``add_special_tokens=True``),
      so a BOS is prepended exactly when the tokenizer itself prepends one (Llama, LLaDA: yes;
      SmolLM2, Qwen2: no), except that a text already starting with the BOS text (EOS when the
      tokenizer has no BOS) gets none added. This is what lm-eval's ``hf`` model does when
      ``add_bos_token`` is not given, the setting its published numbers use; it makes the
      figures comparable with lm-eval's, and no model is scored on a context its tokenizer
      would never produce.
    - An empty context is the prefix token alone (BOS, else EOS), as in lm-eval; so is a
      context that encodes to no token at all.
    """
    prefix = _prefix_token_id(tokenizer)
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix_text = tokenizer.decode([prefix]) if prefix is not None else ""
    special = not (prefix_text and context.startswith(prefix_text))
    whole = tokenizer.encode(context + continuation, add_special_tokens=special)
    ctx = tokenizer.encode(context, add_special_tokens=special)
    if not ctx:  # a context of whitespace only
        return [prefix], whole
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def continuation_logprobs(
    model: Any,
    family: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    mask_id: int | None = None,
    mc_samples: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    batch_tokens: int | None = None,
) -> list[tuple[float, bool]]:
    """log p(continuation | context) for each ``(context, continuation)`` pair, and whether
    the continuation is the model's greedy choice, in the order given (lm-eval's
    ``loglikelihood``). Tokens as :func:`encode_pair` makes them.

    Autoregressive families: the exact sum of next-token log-probabilities of the
    continuation's tokens; greedy when every one of them is the argmax. Pairs run
    ``batch_size`` at a time, longest first, equal to one at a time up to float rounding. On a
    transformers model, pairs that share their context (a multiple-choice item's choices) run
    it once: one pass over the distinct contexts, left-padded, fills a KV cache and predicts
    each continuation's first token; a second pass runs the continuations on that cache (about
    2.5x faster on ARC). Other models (ONNX Runtime) run each pair whole, right-padded. A
    sequence longer than ``max_length`` + 1 tokens loses tokens on the left, as in lm-eval.
    With ``batch_tokens``, a batch holds as many pairs (up to ``batch_size``) as keep its
    padded size, pairs x longest sequence, within that many tokens.

    Diffusion families (``family.generative_kind == "diffusion"``; ``mask_id`` required): the
    masked-diffusion Monte Carlo estimate of LLaDA's evaluation. For ``mc_samples`` draws with
    stratified ratios t = (k + 0.5) / mc_samples, each continuation token is replaced by
    ``mask_id`` with probability t (at least one), and the estimate of -log p is the mean of
    (1/t) x the masked tokens' negative log-likelihood given the rest. The draws of a pair come
    from a generator seeded with ``seed`` alone, so a pair gets the same masks in any batch and
    on any model: deterministic, and paired between a model and its compressed copy. Greedy
    means that with the whole continuation masked, every token is the argmax. One forward pass
    per draw (plus one for greedy) per ``batch_size`` pairs; sequences are cut on the left to
    ``max_length`` tokens.
    """
    from ..runtime import model_device

    diffusion = family.generative_kind == "diffusion"
    if diffusion and mask_id is None:
        raise ValueError("a diffusion model's log-likelihood needs the mask token id")
    encoded = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"the continuation {continuation!r} of {context[-40:]!r} has no token to score")
        whole = ctx + cont
        keep = (max_length + (0 if diffusion else 1)) if max_length else len(whole)
        if len(cont) > keep - (0 if diffusion else 1):
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's {max_length}")
        encoded.append((whole[-keep:], len(cont)))
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # longest first: least padding
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    for chunk in _chunks(order, [len(whole) for whole, _ in encoded], max(1, batch_size), batch_tokens):
        batch = [encoded[i] for i in chunk]
        run = _masked_batch if diffusion else (_shared_prefix_batch if _caches(model) else _autoregressive_batch)
        for i, result in zip(chunk, run(model, family, batch, device, pad, mask_id, mc_samples, seed)):
            out[i] = result
    return out


def _chunks(order: list[int], lengths: list[int], size: int, tokens: int | None) -> list[list[int]]:
    """``order`` (longest first) cut into batches of at most ``size`` pairs and, with
    ``tokens``, at most that many padded tokens (a batch's first pair is its longest)."""
    chunks: list[list[int]] = []
    for i in order:
        last = chunks[-1] if chunks else None
        if last and len(last) < size and (tokens is None or (len(last) + 1) * lengths[last[0]] <= tokens):
            last.append(i)
        else:
            chunks.append([i])
    return chunks


def _padded(rows: list[list[int]], device: Any, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..analyze.calibration import pad_right

    ids, attention = pad_right(rows, pad)
    return ids.to(device), attention.to(device)


def _autoregressive_batch(model, family, batch, device, pad, mask_id, mc_samples, seed) -> list[tuple[float, bool]]:
    rows = [whole[:-1] for whole, _ in batch]  # the last token is predicted, never fed
    ids, attention = _padded(rows, device, pad)
    logits = family.logits(model, ids, attention)
    results = []
    for r, (whole, n) in enumerate(batch):
        end = len(whole) - 1
        scores = logits[r, end - n : end].float()  # position i predicts token i + 1
        target = torch.tensor(whole[-n:], device=scores.device)
        logprob = F.log_softmax(scores, -1).gather(-1, target[:, None]).sum()
        results.append((float(logprob), bool((scores.argmax(-1) == target).all())))
    return results


def _caches(model: Any) -> bool:
    """Whether ``model`` is a transformers model whose forward takes a KV cache and
    ``logits_to_keep`` (what the shared-prefix path needs)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    params = _forward_params(model)
    return "logits_to_keep" in params and ("cache" in params or "past_key_values" in params)


def _shared_prefix_batch(model, family, batch, device, pad, mask_id, mc_samples, seed) -> list[tuple[float, bool]]:
    """_autoregressive_batch's results with each distinct context run once (see
    continuation_logprobs). The contexts are left-padded so that every one ends at the last
    position, with explicit positions so that padding shifts nothing."""
    from transformers import DynamicCache

    from ..runtime import cache_kwarg

    cache_arg = cache_kwarg(model)
    prefixes: dict[tuple[int, ...], int] = {}
    for whole, n in batch:
        prefixes.setdefault(tuple(whole[:-n]), len(prefixes))
    rows = list(prefixes)
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    first = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                  logits_to_keep=1, **{cache_arg: cache}).logits[:, -1].float()
    first = F.log_softmax(first, -1)

    row = torch.tensor([prefixes[tuple(whole[:-n])] for whole, n in batch], device=device)
    longest = max(n for _, n in batch) - 1
    rest = None
    if longest > 0:  # the continuations' tokens after the first, on the contexts' cache
        cache.batch_select_indices(row)
        tail = torch.tensor([whole[-n:-1] + [pad] * (longest - n + 1) for whole, n in batch], device=device)
        tail_mask = torch.tensor([[1] * (n - 1) + [0] * (longest - n + 1) for _, n in batch], device=device)
        start = torch.tensor([len(whole) - n for whole, n in batch], device=device)
        tail_positions = start[:, None] + torch.arange(longest, device=device)[None]
        rest = model(input_ids=tail, attention_mask=torch.cat([attention[row], tail_mask], 1),
                     position_ids=tail_positions, use_cache=True, **{cache_arg: cache}).logits.float()
        rest = F.log_softmax(rest, -1)
    results = []
    for r, (whole, n) in enumerate(batch):
        target = torch.tensor(whole[-n:], device=device)
        scores = first[row[r]][None]
        if n > 1:
            scores = torch.cat([scores, rest[r, : n - 1]])
        logprob = scores.gather(-1, target[:, None]).sum()
        results.append((float(logprob), bool((scores.argmax(-1) == target).all())))
    return results


def _forward_params(model: Any) -> Any:
    import inspect

    return inspect.signature(model.forward).parameters


def _masked_batch(model, family, batch, device, pad, mask_id, mc_samples, seed) -> list[tuple[float, bool]]:
    masks = []  # per pair, per draw: which continuation tokens are masked
    for _, n in batch:
        generator = torch.Generator().manual_seed(seed)
        draws = []
        for k in range(mc_samples):
            masked = torch.rand(n, generator=generator) < (k + 0.5) / mc_samples
            if not masked.any():
                masked[torch.randint(n, (1,), generator=generator)] = True
            draws.append(masked)
        masks.append(draws)
    starts = [len(whole) - n for whole, n in batch]
    window = (min(starts), max(len(whole) for whole, _ in batch))  # the LM head runs on these positions only

    def forward(chosen: list[torch.Tensor]) -> torch.Tensor:
        rows = []
        for (whole, n), at, masked in zip(batch, starts, chosen):
            cont = torch.tensor(whole[at:])
            rows.append(whole[:at] + torch.where(masked, mask_id, cont).tolist())
        ids, attention = _padded(rows, device, pad)
        return family.token_logits(model, ids, attention, window=window).float()

    nll = [0.0] * len(batch)
    for k in range(mc_samples):
        t = (k + 0.5) / mc_samples
        logits = forward([draws[k] for draws in masks])
        for r, ((whole, n), at) in enumerate(zip(batch, starts)):
            masked = masks[r][k].to(logits.device)
            scores = logits[r, at - window[0] : at - window[0] + n][masked]
            target = torch.tensor(whole[at:], device=logits.device)[masked]
            nll[r] += float(F.cross_entropy(scores, target, reduction="sum")) / t
    logits = forward([torch.ones(n, dtype=torch.bool) for _, n in batch])
    results = []
    for r, ((whole, n), at) in enumerate(zip(batch, starts)):
        greedy = logits[r, at - window[0] : at - window[0] + n].argmax(-1)
        target = torch.tensor(whole[at:], device=logits.device)
        results.append((-nll[r] / mc_samples, bool((greedy == target).all())))
    return results
