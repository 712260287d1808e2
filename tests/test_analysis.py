import math

import pytest
import torch
import torch.nn.functional as F

from helpers import load
from repskip.analyze import calibration
from repskip.analyze.analysis import LayerStatsAccumulator, collect
from repskip.errors import RepskipError
from repskip.pipeline import analyze, open_model


def calib_set(path, n=6, max_length=40):
    tok = open_model(path).family.load_tokenizer(path)
    return calibration.build(tok, None, num_samples=n, max_length=max_length)


def brute_force_states(model, sequences):
    """Every layer's raw input and output, one sequence at a time, no padding at all."""
    layers = model.model.layers
    per_seq = []
    for seq in sequences:
        states = {}
        handles = [
            layer.register_forward_hook(
                lambda m, a, kw, out, i=i: states.__setitem__(i, ((a[0] if a else kw["hidden_states"])[0], out[0] if isinstance(out, tuple) else out[0])),
                with_kwargs=True,
            )
            for i, layer in enumerate(layers)
        ]
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        for h in handles:
            h.remove()
        per_seq.append([states[0][0]] + [states[i][1] for i in range(len(layers))])
    return per_seq  # [seq][state 0..L] -> [T, D]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_streaming_statistics_equal_brute_force_over_all_states(tiny, family):
    path = tiny[family]
    handle = open_model(path)
    model = load(path)
    cal = calib_set(path)
    acc = collect(model, handle.family, cal, pad_id=0, batch_size=4, max_distance=8)
    states = brute_force_states(model, cal.sequences)
    L = len(model.model.layers)

    result = acc.group_result("tokens")
    for l in range(L):
        cos = torch.cat([F.cosine_similarity(s[l], s[l + 1], dim=-1) for s in states])
        row = result["layers"][l]
        assert row["cosine_mean"] == pytest.approx(cos.mean().item(), abs=1e-5)
        assert row["cosine_std"] == pytest.approx(cos.std(unbiased=False).item(), abs=1e-4)
        assert row["cosine_min"] == pytest.approx(cos.min().item(), abs=1e-5)
        assert row["block_influence"] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
        angle = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
        assert row["angular_distance_mean"] == pytest.approx(angle, abs=1e-4)

    for i in range(L + 1):
        for j in range(L + 1):
            cos = torch.cat([F.cosine_similarity(s[i], s[j], dim=-1) for s in states])
            assert result["similarity_matrix"][i][j] == pytest.approx(cos.mean().item(), abs=1e-5)

    last = acc.group_result("last_token")
    for l in range(L):
        cos = torch.stack([F.cosine_similarity(s[l][-1], s[l + 1][-1], dim=0) for s in states])
        assert last["layers"][l]["cosine_mean"] == pytest.approx(cos.mean().item(), abs=1e-5)
    for i, j in [(0, 3), (2, 4), (1, L)]:  # Gromov's distance: the mean of per-sequence angles
        cos = torch.stack([F.cosine_similarity(s[i][-1], s[j][-1], dim=0) for s in states]).clamp(-1, 1)
        angle = (torch.arccos(cos) / math.pi).mean().item()
        assert last["angular_distance_matrix"][i][j] == pytest.approx(angle, abs=1e-5)
        assert last["angular_distance_matrix"][j][i] == pytest.approx(angle, abs=1e-5)

    profile = acc.profile_result()
    for l in (0, L - 1):
        for d in (1, 5):
            sims = torch.cat([F.cosine_similarity(s[l + 1][d:], s[l + 1][:-d], dim=-1) for s in states])
            k = profile["distances"].index(d)
            assert profile["similarity"][l][k] == pytest.approx(sims.mean().item(), abs=1e-5)
            assert profile["pairs"][k] == sims.numel()


def test_hooks_see_the_raw_last_layer_output_not_the_final_norm(tiny):
    """output_hidden_states ends with the final-normed state; the analysis must not use it."""
    path = tiny["llama"]
    handle = open_model(path)
    model = load(path)
    cal = calib_set(path, n=2)
    acc = collect(model, handle.family, cal, pad_id=0, batch_size=1)
    ours = acc.group_result("tokens")["layers"][-1]["cosine_mean"]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([cal.sequences[0]]), output_hidden_states=True).hidden_states
    normed_cos = F.cosine_similarity(hs[-2][0], hs[-1][0], dim=-1).mean().item()
    states = brute_force_states(model, cal.sequences[:1])
    raw_cos = F.cosine_similarity(states[0][-2], states[0][-1], dim=-1).mean().item()
    assert abs(normed_cos - raw_cos) > 1e-3  # the two really differ on this model
    acc1 = collect(model, handle.family, calibration.CalibrationSet("x", cal.sequences[:1], 40), pad_id=0)
    assert acc1.group_result("tokens")["layers"][-1]["cosine_mean"] == pytest.approx(raw_cos, abs=1e-5)
    assert ours != pytest.approx(normed_cos, abs=1e-4)


def test_batching_and_padding_do_not_change_the_statistics(tiny):
    path = tiny["qwen2"]
    handle = open_model(path)
    model = load(path)
    cal = calib_set(path, n=6)
    one = collect(model, handle.family, cal, pad_id=0, batch_size=1).group_result("tokens")
    many = collect(model, handle.family, cal, pad_id=0, batch_size=6).group_result("tokens")
    assert one["tokens"] == many["tokens"] == cal.tokens
    for a, b in zip(one["layers"], many["layers"]):
        assert a["cosine_mean"] == pytest.approx(b["cosine_mean"], abs=1e-5)


def test_accumulator_memory_does_not_grow_with_data():
    L, D = 4, 32
    acc = LayerStatsAccumulator(L, ["tokens"], max_distance=8)

    def footprint():
        tensors = [acc.profile_sum, acc.profile_pairs]
        for g in acc.groups.values():
            tensors += [g.cos_sum, g.cos_sq_sum, g.cos_min, g.cos_max, g.angle_sum, g.gram_sum]
        return sum(t.numel() for t in tensors)

    sizes = []
    for batch in range(5):
        valid = torch.ones(3, 50 + 10 * batch, dtype=torch.bool)
        acc.begin_batch(valid, {"tokens": valid})
        h = torch.randn(3, valid.shape[1], D)
        for l in range(L):
            h2 = h + 0.1 * torch.randn_like(h)
            acc.layer(l, h, h2)
            h = h2
        acc.end_batch()
        sizes.append(footprint())
    assert len(set(sizes)) == 1
    # profile sums and pair counts, five per-layer sums, the state-similarity matrix
    assert sizes[0] == L * 9 + 9 + 5 * L + (L + 1) ** 2


def test_last_position_analysis_uses_one_token_per_sequence(tiny):
    result = analyze(tiny["llama"], num_samples=5, max_length=30, positions="last")
    assert result.data["groups"]["tokens"]["tokens"] == 5
    assert result.cosine("tokens") == pytest.approx(result.cosine("last_token"))


def test_analysis_json_shape(tiny):
    result = analyze(tiny["qwen3"], num_samples=4, max_length=24)
    data = result.data
    assert data["schema_version"] == 1 and data["kind"] == "repskip.analysis"
    assert data["model"]["num_layers"] == 6 and data["model"]["fingerprint"].startswith("sha256:")
    assert len(data["groups"]["tokens"]["similarity_matrix"]) == 7
    assert data["calibration"]["sequences"] == 4
    assert data["versions"]["torch"] == torch.__version__


def test_unknown_positions_is_an_error(tiny):
    with pytest.raises(RepskipError, match="unknown positions"):
        analyze(tiny["llama"], num_samples=2, positions="middle")


def test_calibration_from_jsonl_and_txt(tmp_path, tiny):
    tok = open_model(tiny["llama"]).family.load_tokenizer(tiny["llama"])
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"question": "How many apples are left over?"}\n{"question": "What is two plus two, in words?"}\n')
    cal = calibration.build(tok, jl, num_samples=10, max_length=16)
    assert len(cal.sequences) == 2 and all(len(s) <= 16 for s in cal.sequences)
    txt = tmp_path / "c.txt"
    txt.write_text("First paragraph of some length here.\n\nSecond paragraph, also long enough.\n")
    assert len(calibration.build(tok, txt).sequences) == 2
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(RepskipError, match="holds no text"):
        calibration.build(tok, empty)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"answer": 3}\n')
    with pytest.raises(RepskipError, match="no 'text / question"):
        calibration.build(tok, bad)
    with pytest.raises(RepskipError, match="does not exist"):
        calibration.build(tok, tmp_path / "nope.txt")


def test_paragraphs_split_at_blank_lines_that_hold_spaces(tmp_path):
    from repskip.analyze.calibration import load_texts

    path = tmp_path / "wiki.txt"
    path.write_text(" = Heading = \n \n The first paragraph is here and long enough . \n \n The second one follows it here . \n")
    texts, _ = load_texts(path)
    assert texts == ["The first paragraph is here and long enough .", "The second one follows it here ."]


def test_matrix_token_cap_bounds_the_matrix_sample_and_leaves_layer_scores_alone(tiny):
    full = analyze(tiny["qwen2"], num_samples=6, max_length=40)
    capped = analyze(tiny["qwen2"], num_samples=6, max_length=40, matrix_tokens=16)
    a, b = full.data["groups"]["tokens"], capped.data["groups"]["tokens"]
    assert [r["cosine_mean"] for r in a["layers"]] == [r["cosine_mean"] for r in b["layers"]]
    batches = -(-6 // 8)
    assert b["matrix_tokens"] == 16 * batches < a["matrix_tokens"] == a["tokens"]
    for i in range(7):
        assert b["similarity_matrix"][i][i] == pytest.approx(1.0)
        for j in range(7):  # a 16-token sample of each batch estimates the same matrix
            assert abs(b["similarity_matrix"][i][j] - a["similarity_matrix"][i][j]) < 0.15
    assert capped.data["settings"]["matrix_tokens"] == 16
    again = analyze(tiny["qwen2"], num_samples=6, max_length=40, matrix_tokens=16)
    assert again.data["groups"]["tokens"]["similarity_matrix"] == b["similarity_matrix"]  # seeded
