import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from repskip.flops import DecoderGeometry, compare, forward_flops
from repskip.pipeline import open_model


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("seq_len", [17, 64])
def test_analytic_forward_flops_agree_with_torch_flop_counter(tiny, family, seq_len):
    handle = open_model(tiny[family])
    geo = handle.family.geometry(handle.ckpt.config)
    model = AutoModelForCausalLM.from_pretrained(tiny[family], attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    measured = counter.get_total_flops()
    analytic = 2 * forward_flops(geo, seq_len).total  # two sequences in the batch
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
