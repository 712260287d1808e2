"""Layer-by-layer execution (repskip/engine/layerwise.py) computes what the whole model's
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
                                        "gpt2", "gpt_neox", "qwen3_next", "bamba", "bloom", "rwkv"])
def test_layer_by_layer_statistics_equal_the_whole_forwards(model_type, tmp_path):
    """Sliding and global masks, MoE routing, latent attention, linear attention, layers outside
    model.layers, layers that return a tuple the model's forward unpacks (Bamba, BLOOM), a model
    that rescales its blocks' weights on its first forward (RWKV): every statistic and the
    similarity matrix equal, not merely close."""
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
    from repskip.engine import layerwise

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


def _offloaded(path, tmp_path, count):
    """transformers' big-model loading with every decoder layer on "disk"."""
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(count)}}
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off"),
                                                dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_disk_offloaded_model_run_layer_by_layer_gives_the_in_memory_statistics(model_type, tmp_path, monkeypatch):
    """The ground the sequential engine stands on: transformers' big-model loading with every
    decoder layer on "disk" (accelerate streams each layer's weights in for its forward; plain
    tensors are read from the checkpoint's own shards, converted ones such as Mixtral's fused
    experts are written to the offload folder), run layer by layer: the in-memory statistics,
    each layer's weights loaded once for all the batches, not once per batch."""
    from accelerate.hooks import AlignDevicesHook

    path = A.make(model_type, tmp_path)
    handle = open_model(path)
    model = handle.load()
    count = len(handle.family.decoder_layers(model))
    offloaded = _offloaded(path, tmp_path, count)
    assert all(p.device.type == "meta" for p in handle.family.decoder_layers(offloaded).parameters())
    ids = A.ids(batch=6, length=32)
    cal = calibration.CalibrationSet("random", [ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14])], 32)
    whole = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, matrix_groups=["tokens"])
    loads: dict[int, int] = {}
    onload = AlignDevicesHook._onload_weights

    def counted(self, module):
        loads[id(module)] = loads.get(id(module), 0) + 1
        return onload(self, module)

    monkeypatch.setattr(AlignDevicesHook, "_onload_weights", counted)
    layered = collect(offloaded, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, matrix_groups=["tokens"],
                      layerwise=True)
    assert _statistics(layered) == _statistics(whole)
    layers = handle.family.decoder_layers(offloaded)
    hooked = [[m for m in layer.modules() if getattr(m, "_hf_hook", None) and m._hf_hook.offload] for layer in layers]
    assert all(hooked)
    # two batches, one load; the first layer runs once more, on the first recording, to show
    # what a layer returns
    assert {loads.get(id(m)) for m in hooked[0]} == {2}
    assert {loads.get(id(m)) for layer in hooked[1:] for m in layer} == {1}
    assert all(p.device.type == "meta" for p in handle.family.decoder_layers(offloaded).parameters())


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_disk_offloaded_model_gets_the_in_memory_repair(model_type, tmp_path):
    from repskip.analyze.objective import Objective
    from repskip.repair.fit import calibration_batches
    from repskip.repair.sweep import fit_linear_layerwise

    path = A.make(model_type, tmp_path)
    handle = open_model(path)
    model = handle.load()
    offloaded = _offloaded(path, tmp_path, handle.num_layers)
    ids = A.ids(batch=8, length=32)
    batches = calibration_batches([ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14, 30, 31])], 3, 0)
    fits = [fit_linear_layerwise(m, handle.family, batches, Objective(handle.family), [2, 4], handle.num_layers)
            for m in (model, offloaded)]
    assert sorted(fits[0].maps) == sorted(fits[1].maps) == [1, 3]
    assert all((fits[0].maps[a] == fits[1].maps[a]).all() for a in fits[0].maps)
    assert fits[0].details == fits[1].details


def _fit_both(path, removed):
    from repskip.analyze.objective import Objective
    from repskip.repair.fit import calibration_batches, fit_linear
    from repskip.repair.sweep import fit_linear_layerwise

    handle = open_model(path)
    model, fam = handle.load(), handle.family
    ids = A.ids(batch=8, length=32)
    lengths = [32, 20, 27, 9, 32, 14, 30, 31]
    batches = calibration_batches([ids[i, :n].tolist() for i, n in enumerate(lengths)], 3, 0)
    mask_id = fam.mask_token_id(handle.ckpt.config) if fam.generative_kind == "diffusion" else None
    objective = Objective(fam, "nll", mask_id)
    whole = fit_linear(model, fam, batches, objective, removed, handle.num_layers)
    layered = fit_linear_layerwise(model, fam, batches, objective, removed, handle.num_layers)
    return whole, layered


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llada", "dream"])
def test_the_two_sweep_repair_fit_equals_the_run_by_run_fit(name, tiny, tmp_path):
    """Same maps, bit for bit, and the same KL check record, for each family's tiny model: a
    two-layer run and a lone layer (so one map is fitted on states an earlier map changed)."""
    from helpers import dream_from_qwen2, llada_from_llama

    convert = {"llada": (llada_from_llama, "llama"), "dream": (dream_from_qwen2, "qwen2")}
    path = convert[name][0](tiny[convert[name][1]], tmp_path / name) if name in convert else tiny[name]
    whole, layered = _fit_both(path, [1, 2, 4])
    assert sorted(whole.maps) == sorted(layered.maps) == [0, 3]
    for anchor in whole.maps:
        assert (whole.maps[anchor] == layered.maps[anchor]).all()
    assert whole.details == layered.details and whole.tokens == layered.tokens
    assert [r.anchor for r in whole.dropped] == [r.anchor for r in layered.dropped]


@pytest.mark.parametrize("name", ["llama", "llada"])
def test_several_removals_fitted_in_one_full_sweep_equal_each_fitted_alone(name, tiny, tmp_path):
    """fit_linear_many (auto's candidates) shares the full model's sweep: removals that share a
    first anchor ([1, 2] and [1, 2, 4]), a run's end ([3, 4] and [4]) or nothing get the maps,
    check record and dropped runs of fitting each alone, bit for bit."""
    from helpers import llada_from_llama

    from repskip.analyze.objective import Objective
    from repskip.repair.fit import calibration_batches
    from repskip.repair.sweep import fit_linear_layerwise, fit_linear_many

    path = llada_from_llama(tiny["llama"], tmp_path / name) if name == "llada" else tiny[name]
    handle = open_model(path)
    model, fam = handle.load(), handle.family
    ids = A.ids(batch=8, length=32)
    batches = calibration_batches([ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14, 30, 31])], 3, 0)
    mask_id = fam.mask_token_id(handle.ckpt.config) if fam.generative_kind == "diffusion" else None
    objective = Objective(fam, "nll", mask_id)
    removals = [[1, 2], [3, 4], [1, 2, 4], [4], [2]]
    together = fit_linear_many(model, fam, batches, objective, removals, handle.num_layers)
    for removed, many in zip(removals, together):
        alone = fit_linear_layerwise(model, fam, batches, objective, removed, handle.num_layers)
        assert sorted(many.maps) == sorted(alone.maps) and many.maps, removed
        for anchor in alone.maps:
            assert (many.maps[anchor] == alone.maps[anchor]).all(), removed
        assert many.details == alone.details and many.tokens == alone.tokens and many.runs == alone.runs
        assert [r.anchor for r in many.dropped] == [r.anchor for r in alone.dropped]
        assert many.seconds > 0
    # unchecked: every run gets its fit at the ridge as it is; where the check kept that map the
    # numbers are the same (the check's own fits run on the model the earlier maps left)
    unchecked = fit_linear_many(model, fam, batches, objective, removals, handle.num_layers, check=False)
    for fit, plain in zip(together, unchecked):
        assert sorted(plain.maps) == [run.anchor for run in plain.runs] and plain.dropped == []
        first = fit.details[0]
        if first["kept"] and first["check_loss"].get("ridge x1") is not None \
                and first["check_loss"]["ridge x1"] < first["check_loss"]["none"]:
            assert (plain.maps[first["anchor"]] == fit.maps[first["anchor"]]).all()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt2", "gpt_neox", "opt", "deepseek_v3", "bamba", "bloom"])
def test_the_two_sweep_repair_fit_equals_the_run_by_run_fit_across_layouts(model_type, tmp_path):
    whole, layered = _fit_both(A.make(model_type, tmp_path), [2, 4])
    assert sorted(whole.maps) == sorted(layered.maps)
    for anchor in whole.maps:
        assert (whole.maps[anchor] == layered.maps[anchor]).all()
    assert whole.details == layered.details


def test_states_spilled_to_disk_give_the_same_statistics_and_maps(tmp_path):
    """A state budget of nothing: every calibration state between layers goes through a
    safetensors file in the scratch folder and back; the statistics and the repair maps are
    those kept in memory, and the files are gone afterwards."""
    from repskip.analyze.objective import Objective
    from repskip.engine import states
    from repskip.repair.fit import calibration_batches
    from repskip.repair.sweep import fit_linear_layerwise

    path = A.make("llama", tmp_path)
    handle = open_model(path)
    model = handle.load()
    ids = A.ids(batch=6, length=32)
    cal = calibration.CalibrationSet("random", [ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14])], 32)
    batches = calibration_batches(cal.sequences, 4, 0)
    kept = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, layerwise=True)
    fit = fit_linear_layerwise(model, handle.family, batches, Objective(handle.family), [2, 4], handle.num_layers)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mine = scratch / "state-0.safetensors"  # a file of the user's own, named as a spilled state would be
    mine.write_bytes(b"the user's")
    spilled = []
    real = states.StateStore.__setitem__

    def counted(self, key, tensor):
        real(self, key, tensor)
        spilled.append(self.spilled)

    model.repskip_state_budget = (0, scratch)
    try:
        states.StateStore.__setitem__ = counted
        spilled_stats = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8, layerwise=True)
        spilled_fit = fit_linear_layerwise(model, handle.family, batches, Objective(handle.family), [2, 4],
                                           handle.num_layers)
    finally:
        states.StateStore.__setitem__ = real
    assert spilled and max(spilled) > 10  # the states went to disk
    assert _statistics(spilled_stats) == _statistics(kept)
    assert sorted(spilled_fit.maps) == sorted(fit.maps) and fit.maps
    for anchor in fit.maps:
        assert (spilled_fit.maps[anchor] == fit.maps[anchor]).all()
    assert spilled_fit.details == fit.details
    assert list(scratch.iterdir()) == [mine] and mine.read_bytes() == b"the user's"


def _search(model, handle, strategy, kind, repair, batches, fit_batches):
    from repskip.analyze.objective import Objective
    from repskip.analyze.search import search

    fam = handle.family
    mask_id = fam.mask_token_id(handle.ckpt.config) if fam.generative_kind == "diffusion" else None
    return search(model, fam, batches, Objective(fam, kind, mask_id), strategy=strategy, k=2,
                  protected={0, handle.num_layers - 1}, repair=repair, fit_batches=fit_batches,
                  check_batches=fit_batches)


@pytest.mark.parametrize("strategy, kind, repair", [("greedy-loss", "nll", True), ("loss", "kl", False),
                                                    ("greedy-loss", "kl", True)])
def test_the_loss_search_on_a_streamed_model_makes_the_in_memory_choices(strategy, kind, repair, tmp_path):
    """Every round's candidate losses, choices and map checks: those of the in-memory search,
    with each layer run once per sweep over all the trials instead of once per trial."""
    from repskip.repair.fit import calibration_batches

    path = A.make("llama", tmp_path)
    handle = open_model(path)
    model = handle.load()
    ids = A.ids(batch=8, length=32)
    sequences = [ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14, 30, 31])]
    batches, fit_batches = calibration_batches(sequences[:4], 3, 0), calibration_batches(sequences[4:], 3, 0)
    whole = _search(model, handle, strategy, kind, repair, batches, fit_batches)
    offloaded = _offloaded(path, tmp_path, handle.num_layers)
    offloaded.repskip_layerwise = True
    streamed = _search(offloaded, handle, strategy, kind, repair, batches, fit_batches)
    assert [r.chosen for r in streamed.rounds] == [r.chosen for r in whole.rounds]
    assert [r.checked for r in streamed.rounds] == [r.checked for r in whole.rounds]
    for mine, theirs in zip(streamed.rounds, whole.rounds):
        assert mine.losses.keys() == theirs.losses.keys()
        for c in theirs.losses:
            assert mine.losses[c] == pytest.approx(theirs.losses[c], rel=1e-5, abs=1e-7), c
    assert streamed.base_loss == pytest.approx(whole.base_loss, rel=1e-5)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "llada", "dream"])
def test_the_loss_search_streamed_from_disk_makes_the_in_memory_choices_in_every_family(name, tiny, tmp_path):
    """greedy-loss with the repair in the loop, on each family's tiny checkpoint loaded as
    analyze --offload sequential loads it (the diffusion families' masked-token loss
    included): the same rounds as in memory."""
    from helpers import dream_from_qwen2, llada_from_llama

    from repskip.engine import offload
    from repskip.repair.fit import calibration_batches

    convert = {"llada": (llada_from_llama, "llama"), "dream": (dream_from_qwen2, "qwen2")}
    path = convert[name][0](tiny[convert[name][1]], tmp_path / name) if name in convert else tiny[name]
    handle = open_model(path)
    ids = A.ids(batch=6, length=24, seed=3) % 200 + 10  # within every tiny vocabulary, past the special ids
    sequences = [ids[i, :n].tolist() for i, n in enumerate([24, 16, 20, 9, 24, 14])]
    batches, fit_batches = calibration_batches(sequences[:3], 2, 0), calibration_batches(sequences[3:], 2, 0)
    whole = _search(handle.load(), handle, "greedy-loss", "nll", True, batches, fit_batches)
    with offload.loaded(handle, None, "cpu", plan="sequential") as streamed_model:
        assert streamed_model.repskip_layerwise
        streamed = _search(streamed_model, handle, "greedy-loss", "nll", True, batches, fit_batches)
    assert [r.chosen for r in streamed.rounds] == [r.chosen for r in whole.rounds]
    assert [r.checked for r in streamed.rounds] == [r.checked for r in whole.rounds]
    for mine, theirs in zip(streamed.rounds, whole.rounds):
        assert mine.losses == pytest.approx(theirs.losses, rel=1e-5, abs=1e-7)


def test_the_streamed_search_reads_each_layer_once_per_sweep_not_once_per_trial(tmp_path, monkeypatch):
    """The figure docs/analysis.md gives: a two-round greedy search with repair on the tiny
    Llama loads a middle layer's weights 8 times streamed; run trial by trial on the same
    offloaded model (each candidate's forward in turn), 26 times."""
    from accelerate.hooks import AlignDevicesHook

    from repskip.repair.fit import calibration_batches

    path = A.make("llama", tmp_path)
    handle = open_model(path)
    ids = A.ids(batch=8, length=32)
    sequences = [ids[i, :n].tolist() for i, n in enumerate([32, 20, 27, 9, 32, 14, 30, 31])]
    batches, fit_batches = calibration_batches(sequences[:4], 3, 0), calibration_batches(sequences[4:], 3, 0)
    loads: dict[int, int] = {}
    onload = AlignDevicesHook._onload_weights

    def counted(self, module):
        loads[id(module)] = loads.get(id(module), 0) + 1
        return onload(self, module)

    monkeypatch.setattr(AlignDevicesHook, "_onload_weights", counted)
    counts = {}
    for streamed in (True, False):
        model = _offloaded(path, tmp_path / str(streamed), handle.num_layers)
        model.repskip_layerwise = streamed
        loads.clear()
        _search(model, handle, "greedy-loss", "nll", True, batches, fit_batches)
        hooked = [m for m in handle.family.decoder_layers(model)[3].modules()
                  if getattr(m, "_hf_hook", None) and m._hf_hook.offload]
        counts[streamed] = max(loads.get(id(m), 0) for m in hooked)
    assert counts == {True: 8, False: 26}
