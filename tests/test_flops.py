import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from repskip.flops import DecoderGeometry, compare, forward_flops
from repskip.pipeline import open_model


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "mistral"])
@pytest.mark.parametrize("seq_len", [17, 64])
def test_analytic_forward_flops_agree_with_torch_flop_counter(tiny, family, seq_len):
    handle = open_model(tiny[family])
    cost = handle.family.cost(handle.ckpt.config)
    model = AutoModelForCausalLM.from_pretrained(tiny[family], attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    measured = counter.get_total_flops()
    analytic = 2 * forward_flops(cost, seq_len).total  # two sequences in the batch
    assert abs(analytic - measured) / measured < 0.02, (analytic, measured)


def test_pruned_flops_scale_with_kept_layers_and_keep_lm_head():
    geo = DecoderGeometry(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152, layers=30)
    cmp = compare(geo, removed=6, seq_len=512)
    assert cmp.layer_fraction == pytest.approx(6 / 30)
    assert cmp.pruned.components["lm_head"] == cmp.base.components["lm_head"]
    assert cmp.pruned.components["mlp"] * 30 == cmp.base.components["mlp"] * 24
    # the LM head is not removed, so the exact cut is smaller than the paper's layer fraction
    assert 0 < cmp.forward_reduction < cmp.layer_fraction
    assert cmp.decode_base.tokens == 1 and cmp.decode_base.context == 513


def test_decode_step_attends_to_whole_context():
    geo = DecoderGeometry(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100, layers=2)
    short = forward_flops(geo, 1, context=10)
    long = forward_flops(geo, 1, context=1000)
    assert long.components["attn_scores"] == 100 * short.components["attn_scores"]
    assert long.components["mlp"] == short.components["mlp"]


def test_diffusion_generation_is_steps_times_full_sequence_and_cfg_doubles():
    from repskip.flops import generation_flops

    geo = DecoderGeometry(hidden=64, heads=4, kv_heads=4, head_dim=16, intermediate=128, vocab=100, layers=4)
    one_pass = forward_flops(geo, 10 + 32, logits_tokens=32).total
    g = generation_flops(geo, "diffusion", 10, 32, steps=16)
    assert g.forward_passes == 16 and g.total == 16 * one_pass
    assert generation_flops(geo, "diffusion", 10, 32, steps=16, cfg=True).total == 2 * g.total
    assert generation_flops(geo, "diffusion", 10, 32).forward_passes == 32  # steps default to gen length
    assert g.per_generated_token == g.total / 32


def test_autoregressive_generation_is_prefill_plus_cached_decode():
    from repskip.flops import generation_flops

    geo = DecoderGeometry(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100, layers=4)
    g = generation_flops(geo, "autoregressive", 5, 3)
    want = (forward_flops(geo, 5, logits_tokens=1).total + forward_flops(geo, 1, context=6).total
            + forward_flops(geo, 1, context=7).total)
    assert g.total == want and g.forward_passes == 3


def test_generation_flops_match_the_flop_counter_for_a_real_diffusion_sampler(tmp_path):
    """Count what the LLaDA sampler really computes, forward by forward."""
    from helpers import llada_from_llama, make_checkpoint
    from repskip.flops import generation_flops
    from repskip.sampler import get_sampler

    llada = llada_from_llama(make_checkpoint(tmp_path / "l", "llama", tie_word_embeddings=False), tmp_path / "d")
    handle = open_model(llada)
    model = handle.family.load(llada)
    tok = handle.family.load_tokenizer(llada)
    prompt = "abcdefgh"  # 8 byte-level tokens
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the flop counter cannot see fused CPU attention kernels; the math backend is plain matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        get_sampler("llada").generate(model, tok, [prompt], family=handle.family, steps=4, gen_length=8, block_length=4)
    # the sampler runs the LM head on the current block of 4 only
    analytic = generation_flops(handle.family.geometry(handle.ckpt.config), "diffusion", 8, 8, steps=4,
                                logits_per_pass=4).total
    assert abs(analytic - counter.get_total_flops()) / analytic < 0.02
