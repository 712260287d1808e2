"""Layer-by-layer execution (repskip/analyze/layerwise.py) computes what the whole model's
forward computes: the analysis statistics, bit for bit."""

from __future__ import annotations

import pytest
import torch

import architectures as A
from repskip.analyze import calibration
from repskip.analyze.analysis import collect
from repskip.pipeline import open_model


def _statistics(acc) -> dict:
    groups = {name: acc.group_result(name) for name in acc.groups}
    return {"groups": groups, "profile": acc.profile_result(), "sequences": acc.sequences}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "mixtral", "deepseek_v3", "gpt_oss",
                                        "gpt2", "gpt_neox", "qwen3_next"])
def test_layer_by_layer_statistics_equal_the_whole_forwards(model_type, tmp_path):
    """Sliding and global masks, MoE routing, latent attention, linear attention, layers outside
    model.layers: every statistic and the similarity matrix equal, not merely close."""
    path = A.make(model_type, tmp_path)
    handle = open_model(path)
    model = handle.load()
    ids = A.ids(batch=6, length=32)
    lengths = [32, 20, 27, 9, 32, 14]  # padded batches: each layer's mask matters
    cal = calibration.CalibrationSet("random", [ids[i, :n].tolist() for i, n in enumerate(lengths)], 32)
    whole = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, matrix_groups=["tokens"])
    layered = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, matrix_groups=["tokens"],
                      layerwise=True)
    assert _statistics(layered) == _statistics(whole)


def test_the_layers_are_back_in_place_after_a_failed_recording(tmp_path):
    from repskip.analyze import layerwise

    path = A.make("llama", tmp_path)
    handle = open_model(path)
    model = handle.load()
    before = list(handle.family.decoder_layers(model))

    def broken():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        layerwise.record(model, handle.family, broken)
    assert list(handle.family.decoder_layers(model)) == before
    assert all(isinstance(layer, torch.nn.Module) and type(layer).__name__ != "_Recorder" for layer in before)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_disk_offloaded_model_run_layer_by_layer_gives_the_in_memory_statistics(model_type, tmp_path):
    """The ground the sequential engine stands on: transformers' big-model loading with every
    decoder layer on "disk" (accelerate streams each layer's weights in for its forward; plain
    tensors are read from the checkpoint's own shards, converted ones such as Mixtral's fused
    experts are written to the offload folder), run layer by layer: the in-memory statistics."""
    from transformers import AutoModelForCausalLM

    path = A.make(model_type, tmp_path)
    handle = open_model(path)
    model = handle.load()
    count = len(handle.family.decoder_layers(model))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(count)}}
    offloaded = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off"),
                                                     dtype=torch.float32)
    assert all(p.device.type == "meta" for p in handle.family.decoder_layers(offloaded).parameters())
    ids = A.ids(batch=6, length=32)
    cal = calibration.CalibrationSet("random", [ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14])], 32)
    whole = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, matrix_groups=["tokens"])
    layered = collect(offloaded, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, matrix_groups=["tokens"],
                      layerwise=True)
    assert _statistics(layered) == _statistics(whole)
