"""The speed comparison of verify (repskip.verify.speed) on a fake clock: what is timed, in
which order, and how the ratios are formed. Real figures belong in bench scripts."""

from __future__ import annotations

import types

import pytest
import torch

from repskip.flops import DecoderGeometry
from repskip.verify import speed


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeLM:
    """Costs ``per_token`` fake seconds per input token; records who ran."""

    device = torch.device("cpu")

    def __init__(self, name, per_token, clock, log):
        self.name, self.per_token, self.clock, self.log = name, per_token, clock, log

    def __call__(self, ids, mask, positions, past):
        self.clock.now += self.per_token * ids.shape[1]
        self.log.append(self.name)
        return types.SimpleNamespace(logits=torch.zeros(ids.shape[0], ids.shape[1], 5), past_key_values=None)


def cost(layers):
    return DecoderGeometry(layers=layers, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100).cost()


def test_autoregressive_timing_alternates_and_takes_ratios_per_repeat(monkeypatch):
    clock, log = Clock(), []
    monkeypatch.setattr(speed.time, "perf_counter", clock)
    base = types.SimpleNamespace(model=FakeLM("b", 2.0, clock, log))
    comp = types.SimpleNamespace(model=FakeLM("c", 1.0, clock, log))
    out = speed.measure(base, comp, torch.zeros(1, 10, dtype=torch.long), kind="autoregressive",
                        costs=(cost(8), cost(6)), new_tokens=4, repeats=4)
    runs = [name for i, name in enumerate(log) if i % 4 == 0]  # each run: a prefill and 3 decode steps
    assert runs == ["b", "c", "b", "c", "c", "b", "b", "c", "c", "b"]  # warm-up, then alternating order
    assert out["base"]["prefill_ms"] == pytest.approx(20_000) and out["compressed"]["prefill_ms"] == pytest.approx(10_000)
    assert out["base"]["decode_ms_per_token"] == pytest.approx(2_000)
    assert out["base"]["tokens_per_s"] == pytest.approx(4 / 26)  # 4 tokens: a 20 s prefill and 3 steps of 2 s
    for name in ("prefill", "decode", "generation"):
        assert out["speedup"][name] == {"median": pytest.approx(2), "min": pytest.approx(2), "max": pytest.approx(2)}
    assert 1 < out["flops_ideal"]["decode"] < 8 / 6 and 1 < out["flops_ideal"]["generation"] < 8 / 6


def test_diffusion_timing_is_per_denoising_step(monkeypatch):
    clock, log = Clock(), []
    monkeypatch.setattr(speed.time, "perf_counter", clock)

    class Family:
        @staticmethod
        def token_logits(model, ids, mask, window):
            assert window == (3, 3 + 8) and (ids[0, 3:] == 9).all()  # the canvas is masked, logits for it only
            return model(ids, mask, None, None).logits

    def side(name, cost):
        return types.SimpleNamespace(model=FakeLM(name, cost, clock, log), handle=types.SimpleNamespace(family=Family))

    out = speed.measure(side("b", 3.0), side("c", 1.0), torch.zeros(1, 3, dtype=torch.long), kind="diffusion",
                        costs=(cost(8), cost(4)), new_tokens=8, steps=16, mask_id=9, repeats=3)
    assert out["base"]["step_ms"] == pytest.approx(33_000) and out["compressed"]["step_ms"] == pytest.approx(11_000)
    assert out["base"]["tokens_per_s"] == pytest.approx(8 / (16 * 33))
    assert out["speedup"]["step"]["median"] == pytest.approx(3)
    assert 1 < out["flops_ideal"]["step"] < 2
