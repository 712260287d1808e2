"""The LLaDA and Dream samplers step by step on a toy denoiser whose trajectory is worked
out by hand below, batched against one-by-one, and the end-to-end plugins on tiny models."""

import pytest
import torch

from repskip.errors import RepskipError
from repskip_diffusion.samplers import dream_generate, llada_generate, transfer_schedule

V, MASK = 12, 11
# Confidence of the toy's prediction at each generated position, counted from the first
# real (non-padding) token. Distinct values make the reveal order unambiguous.
CONF = {2: 5.0, 3: 9.0, 4: 1.0, 5: 7.0, 6: 3.0, 7: 8.0, 8: 6.0, 9: 2.0}


def toy(x, attention, window=None):
    """At real position j the toy predicts token (j + number of unmasked real tokens) % 10
    with logit CONF[j] (0 elsewhere): the prediction changes as tokens are revealed. Like a
    real denoiser it returns the logits of the positions in ``window`` only."""
    B, L = x.shape
    logits = torch.zeros(B, L, V)
    logits[:, :, MASK] = float("-inf")  # a denoiser never predicts the mask itself
    for b in range(B):
        pads = int((attention[b] == 0).sum())
        known = int(((x[b] != MASK) & (attention[b] == 1)).sum())
        for pos in range(pads, L):
            j = pos - pads
            logits[b, pos, (j + known) % 10] = CONF.get(j, 4.0)
    return logits if window is None else logits[:, window[0] : window[1]]


def trace_of(run):
    steps = []

    def record(info):
        rows = []
        for b in range(info["x"].shape[0]):
            idx = info["revealed"][b].nonzero().flatten().tolist()
            rows.append([(i, int(info["x"][b, i])) for i in idx])
        steps.append((info["block"], info["step"], rows))

    out = run(record)
    return out, steps


def test_transfer_schedule_spreads_the_remainder_over_the_first_steps():
    got = transfer_schedule(torch.tensor([4, 5, 7, 2]), 3)
    assert got.tolist() == [[2, 1, 1], [2, 2, 1], [3, 2, 2], [1, 1, 0]]


def test_llada_low_confidence_trajectory_worked_out_by_hand():
    prompt = torch.tensor([[1, 2]])
    out, steps = trace_of(lambda rec: llada_generate(
        toy, prompt, torch.ones_like(prompt), mask_id=MASK, steps=6, gen_length=8, block_length=4, on_step=rec))
    # Two blocks of 4 (positions 2-5, 6-9), 3 steps each; 4 masked // 3 = 1 rem 1 -> [2, 1, 1].
    # Block 0 confidences: pos 2: 5, 3: 9, 4: 1, 5: 7 (pos 7's 8 is outside the block: ignored).
    #   step 0 (known 2): reveal 3 -> (3+2)%10 = 5 and 5 -> 7
    #   step 1 (known 4): reveal 2 -> 6;  step 2 (known 5): reveal 4 -> 9
    # Block 1 confidences: pos 6: 3, 7: 8, 8: 6, 9: 2
    #   step 0 (known 6): reveal 7 -> 3 and 8 -> 4
    #   step 1 (known 8): reveal 6 -> 4;  step 2 (known 9): reveal 9 -> 8
    assert steps == [
        (0, 0, [[(3, 5), (5, 7)]]),
        (0, 1, [[(2, 6)]]),
        (0, 2, [[(4, 9)]]),
        (1, 0, [[(7, 3), (8, 4)]]),
        (1, 1, [[(6, 4)]]),
        (1, 2, [[(9, 8)]]),
    ]
    assert out[0].tolist() == [1, 2, 6, 5, 9, 7, 4, 3, 4, 8]


def test_llada_single_block_remainder_rule():
    prompt = torch.tensor([[1, 2]])
    _, steps = trace_of(lambda rec: llada_generate(
        toy, prompt, torch.ones_like(prompt), mask_id=MASK, steps=3, gen_length=8, block_length=8, on_step=rec))
    # 8 masked over 3 steps: [3, 3, 2]; order by confidence 9, 8, 7 | 6, 5, 3 | 2, 1
    assert [[p for p, _ in rows[0]] for _, _, rows in steps] == [[3, 5, 7], [2, 6, 8], [4, 9]]


def test_llada_batched_with_left_padding_equals_one_by_one():
    prompts = [[1, 2], [3]]
    singles = [llada_generate(toy, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), mask_id=MASK,
                              steps=4, gen_length=8, block_length=4)[0].tolist() for p in prompts]
    ids = torch.tensor([[1, 2], [0, 3]])
    mask = torch.tensor([[1, 1], [0, 1]])
    batched = llada_generate(toy, ids, mask, mask_id=MASK, steps=4, gen_length=8, block_length=4)
    assert batched[0].tolist() == singles[0]
    assert batched[1, 1:].tolist() == singles[1]


def test_llada_classifier_free_guidance_combines_as_the_authors_do():
    calls = []

    def guided(x, attention, window):
        calls.append(x.clone())
        logits = torch.zeros(x.shape[0], window[1] - window[0], V)
        half = x.shape[0] // 2
        logits[:half, :, 4] = 2.0  # conditional: token 4 a little
        logits[:half, :, 5] = 1.5
        logits[half:, :, 5] = 3.0  # unconditional: token 5 strongly
        return logits

    prompt = torch.tensor([[1, 2]])
    out = llada_generate(guided, prompt, torch.ones_like(prompt), mask_id=MASK, steps=2, gen_length=2,
                         block_length=2, cfg_scale=1.0)
    # cond 4: 2.0, 5: 1.5; uncond 5: 3.0 -> un + 2 (cond - un): 4 -> 4.0, 5 -> 0.0: token 4
    assert out[0, 2:].tolist() == [4, 4]
    assert calls[0].shape[0] == 2 and calls[0][1, :2].tolist() == [MASK, MASK]  # prompt masked
    assert calls[0][0, :2].tolist() == [1, 2]


def test_llada_temperature_is_seeded_and_random_remasking_reveals_everything():
    prompt = torch.tensor([[1, 2]])
    kw = dict(mask_id=MASK, steps=4, gen_length=8, block_length=8, temperature=1.0, remasking="random")
    a = llada_generate(toy, prompt, torch.ones_like(prompt), generator=torch.Generator().manual_seed(1), **kw)
    b = llada_generate(toy, prompt, torch.ones_like(prompt), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not (a == MASK).any()


def test_llada_eos_suppression():
    def eos_loving(x, attention, window):
        logits = toy(x, attention, window)
        logits[:, :, 7] = 100.0  # token 7 plays EOS
        return logits

    prompt = torch.tensor([[1, 2]])
    plain = llada_generate(eos_loving, prompt, torch.ones_like(prompt), mask_id=MASK, steps=4, gen_length=4, block_length=4)
    assert (plain[0, 2:] == 7).all()
    kept = llada_generate(eos_loving, prompt, torch.ones_like(prompt), mask_id=MASK, steps=4, gen_length=4,
                          block_length=4, eos_id=7, logits_eos_inf=True)
    assert not (kept[0, 2:] == 7).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "not divisible by the number of blocks"),
    (dict(remasking="best"), "remasking 'best'"),
])
def test_llada_bad_settings(kwargs, message):
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(RepskipError, match=message):
        llada_generate(toy, prompt, torch.ones_like(prompt), mask_id=MASK, **{"steps": 4, "gen_length": 8, "block_length": 4, **kwargs})


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_confidence_trajectory_worked_out_by_hand(alg):
    prompt = torch.tensor([[1, 2]])
    out, steps = trace_of(lambda rec: dream_generate(
        toy, prompt, torch.ones_like(prompt), mask_id=MASK, max_new_tokens=8, steps=4, alg=alg, on_step=rec))
    # timesteps = linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001; n = int(masked * (1 - s/t)):
    # step 0: int(8 * .24975) = 1; step 1: int(7 * .33289) = 2; step 2: int(5 * .49900) = 2; last: all 3.
    # On this toy all three confidences order positions as CONF does: 9, 8, 7, 6, 5, 3, 2, 1.
    #   step 0 (known 2): 3 -> 5;  step 1 (known 3): 7 -> 0, 5 -> 8;  step 2 (known 5): 8 -> 3, 2 -> 7
    #   step 3 (known 7): 6 -> 3, 9 -> 6, 4 -> 1
    assert [sorted(rows[0]) for _, _, rows in steps] == [
        [(3, 5)], [(5, 8), (7, 0)], [(2, 7), (8, 3)], [(4, 1), (6, 3), (9, 6)],
    ]
    assert out[0].tolist() == [1, 2, 7, 5, 1, 8, 3, 0, 3, 6]


def test_dream_batched_equals_one_by_one_and_origin_is_seeded():
    ids = torch.tensor([[1, 2], [0, 3]])
    mask = torch.tensor([[1, 1], [0, 1]])
    batched = dream_generate(toy, ids, mask, mask_id=MASK, max_new_tokens=6, steps=3, alg="entropy")
    one = dream_generate(toy, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long), mask_id=MASK, max_new_tokens=6, steps=3, alg="entropy")
    two = dream_generate(toy, torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.long), mask_id=MASK, max_new_tokens=6, steps=3, alg="entropy")
    assert batched[0].tolist() == one[0].tolist() and batched[1, 1:].tolist() == two[0].tolist()
    kw = dict(mask_id=MASK, max_new_tokens=6, steps=3, alg="origin", temperature=0.5)
    a = dream_generate(toy, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = dream_generate(toy, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b) and not (a == MASK).any()


def test_dream_unknown_alg():
    with pytest.raises(RepskipError, match="alg 'best' is unknown"):
        dream_generate(toy, torch.tensor([[1]]), torch.tensor([[1]]), mask_id=MASK, alg="best")


def test_llada_revisits_an_earlier_position_that_still_holds_the_mask():
    """A model may predict the mask token itself; the authors' rule leaves that position
    masked, and since only positions after the current block are excluded, a later block's
    step may reveal it."""
    calls = []

    def stubborn(x, attention, window):
        calls.append(1)
        logits = toy(x, attention, window)
        if len(calls) == 2:  # the second forward: position 2 predicts the mask, confidently
            logits[:, 2 - window[0], :] = -10.0
            logits[:, 2 - window[0], MASK] = 50.0
        return logits

    prompt = torch.tensor([[1, 2]])
    out, steps = trace_of(lambda rec: llada_generate(
        stubborn, prompt, torch.ones_like(prompt), mask_id=MASK, steps=4, gen_length=4, block_length=2, on_step=rec))
    # Block 0 (2, 3), one reveal a step: step 0 reveals 3 (conf 9 > 5); step 1 "reveals" 2 as the mask.
    # Block 1 (4, 5), one a step, candidates include 2: step 0 picks 5 (7 > 5 > 1), step 1 picks 2
    # (5 > 1), so position 4 is never revealed.
    assert [[p for p, _ in rows[0]] for _, _, rows in steps] == [[3], [2], [5], [2]]
    assert out[0, 4] == MASK and out[0, 2] != MASK


def test_llada_random_remasking_draws_float32_as_the_authors_do():
    """With one token revealed per step and temperature 0, the first step reveals the masked
    position with the largest of U ~ torch.rand(sequence shape) in float32 (the authors' draw)
    from the seeded generator; a float64 draw picks other positions for most seeds."""
    prompt = torch.tensor([[1, 2]])
    agree64 = 0
    for seed in range(12):
        out, steps = trace_of(lambda rec, seed=seed: llada_generate(
            toy, prompt, torch.ones_like(prompt), mask_id=MASK, steps=8, gen_length=8, block_length=8,
            remasking="random", generator=torch.Generator().manual_seed(seed), on_step=rec))
        first = steps[0][2][0][0][0]
        u32 = torch.rand((1, 10), generator=torch.Generator().manual_seed(seed))
        u64 = torch.rand((1, 10), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert first == 2 + int(u32[0, 2:].argmax())
        agree64 += first == 2 + int(u64[0, 2:].argmax())
    assert agree64 < 12  # the dtype matters: float64 would give other tokens


def test_llada_eos_eot_confidence_rule_as_the_authors_run_it():
    """confidence_eos_eot_inf: at temperature 0 neither EoS nor EoT can win a reveal by its
    confidence; above 0 only EoT is suppressed (the authors' chained assignment
    `noised[EOS] = logits[EOT] = -inf` leaves EoS in the logits their confidence reads)."""
    EOS, EOT = 7, 8

    def denoiser(special):
        def run(x, attention, window):  # position 2 is sure of `special`, position 3 fairly sure of 1
            logits = torch.zeros(x.shape[0], x.shape[1], V)
            logits[:, :, MASK] = float("-inf")
            logits[:, 2, special] = 20.0
            logits[:, 3, 1] = 8.0
            return logits if window is None else logits[:, window[0] : window[1]]
        return run

    def first_reveal(special, temperature, rule):
        prompt = torch.tensor([[1, 2]])
        _, steps = trace_of(lambda rec: llada_generate(
            denoiser(special), prompt, torch.ones_like(prompt), mask_id=MASK, steps=2, gen_length=2, block_length=2,
            temperature=temperature, eos_id=EOS, eot_id=EOT, confidence_eos_eot_inf=rule,
            generator=torch.Generator().manual_seed(0), on_step=rec))
        return steps[0][2][0]

    for special in (EOS, EOT):
        assert first_reveal(special, 0.0, False) == [(2, special)]  # the surer position first
        assert first_reveal(special, 0.0, True) == [(3, 1)]  # both suppressed at temperature 0
        assert first_reveal(special, 0.5, False) == [(2, special)]
    assert first_reveal(EOT, 0.5, True) == [(3, 1)]  # EoT suppressed above 0
    assert first_reveal(EOS, 0.5, True) == [(2, EOS)]  # EoS is not: as the authors run it
