"""LLaDA and Dream families on repskip's own bidirectional implementation, checked without
any foreign code: with a causal mask forced they must equal transformers' Llama / Qwen2."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import MASK_ID, dream_from_qwen2, llada_from_llama, make_checkpoint
from repskip.errors import RepskipError
from repskip.pipeline import analyze, compress, open_model, resolve_recipe
from repskip.recipe import Recipe, Resolved


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    llama = make_checkpoint(root / "llama", "llama", seed=11, tie_word_embeddings=False)
    qwen2 = make_checkpoint(root / "qwen2", "qwen2", seed=12)
    return {
        "llama": llama,
        "qwen2": qwen2,
        "llada": llada_from_llama(llama, root / "llada"),
        "dream": dream_from_qwen2(qwen2, root / "dream"),
    }


IDS = torch.tensor([[7, 80, 81, 82, 90, 100, 120, 7, 64, 65, 66, 67, 200, 201]])


@pytest.mark.parametrize("family, source", [("llada", "llama"), ("dream", "qwen2")])
def test_causal_forced_logits_equal_the_autoregressive_model(diffusion, family, source):
    handle = open_model(diffusion[family])
    assert handle.family_name == family
    ours = handle.family.load(handle.path)
    reference = AutoModelForCausalLM.from_pretrained(diffusion[source]).eval()
    with torch.no_grad():
        want = reference(IDS).logits
        got = ours(IDS, causal=True)
    assert (got - want).abs().max().item() < 1e-5
    with torch.no_grad():  # and bidirectional attention really is different
        assert (ours(IDS) - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_left_padded_batch_gives_each_prompt_its_own_logits(diffusion, family):
    handle = open_model(diffusion[family])
    model = handle.family.load(handle.path)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42], [90, 91, 92, 93, 94]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched = model(ids, mask)
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p]))
            assert (batched[row, width - len(p):] - alone[0]).abs().max().item() < 1e-5


def test_dream_logits_are_realigned_and_llada_are_not(diffusion):
    for family, shifted in (("dream", True), ("llada", False)):
        handle = open_model(diffusion[family])
        model = handle.family.load(handle.path)
        with torch.no_grad():
            raw = handle.family.logits(model, IDS, None)
            aligned = handle.family.token_logits(model, IDS)
        if shifted:
            assert torch.equal(aligned[:, 1:], raw[:, :-1]) and torch.equal(aligned[:, 0], raw[:, 0])
        else:
            assert torch.equal(aligned, raw)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_compress_then_reload_equals_in_memory_removal(diffusion, tmp_path, family):
    out = tmp_path / "out"
    result, _ = compress(diffusion[family], Recipe(resolved=Resolved(remove=[1, 4])), out)
    assert result.kept == [0, 2, 3, 5]
    config = json.loads((out / "config.json").read_text())
    assert config["n_layers" if family == "llada" else "num_hidden_layers"] == 4
    assert (out / f"modeling_{family}.py").is_file()  # the authors' code travels with it
    if family == "dream":  # Dream's loader reads it
        assert (out / "generation_config.json").read_bytes() == (diffusion[family] / "generation_config.json").read_bytes()
    handle = open_model(out)
    reloaded = handle.family.load(out)
    reference = handle.family.load(diffusion[family])
    handle.family.remove_layers(reference, [0, 2, 3, 5])
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), reference(IDS))
    recipe_text = (out / "repskip-recipe.yaml").read_text()
    assert "- 1\n" in recipe_text and "- 4\n" in recipe_text


def test_analysis_runs_on_a_diffusion_family(diffusion):
    result = analyze(diffusion["llada"], num_samples=4, max_length=24)
    assert result.num_layers == 6 and result.data["model"]["family"] == "llada"


def test_mask_token_must_exist(diffusion, tmp_path):
    fam = open_model(diffusion["llada"]).family
    config = json.loads((diffusion["llada"] / "config.json").read_text())
    assert fam.mask_token_id(config) == MASK_ID
    with pytest.raises(RepskipError, match="no mask_token_id"):
        fam.mask_token_id({k: v for k, v in config.items() if k != "mask_token_id"})
    with pytest.raises(RepskipError, match="outside the vocabulary"):
        fam.mask_token_id({**config, "mask_token_id": 10_000})


def test_layout_mismatch_is_an_error(diffusion, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(diffusion["llada"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_layers"] = 5
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RepskipError, match="declares 5 layers"):  # refused when opened
        open_model(bad)
    family = open_model(diffusion["llada"]).family
    with pytest.raises(RepskipError, match="not part of the model"):  # and by the loader itself
        family.load(bad)


def _sample(diffusion, family, prompts, **settings):
    from repskip.sampler import get_sampler

    handle = open_model(diffusion[family])
    model = handle.family.load(handle.path)
    tok = handle.family.load_tokenizer(handle.path)
    return get_sampler(handle.family.default_sampler).generate(model, tok, prompts, family=handle.family, **settings)


@pytest.mark.parametrize("family, settings", [
    ("llada", dict(steps=8, gen_length=8, block_length=4)),
    ("llada", dict(steps=4, gen_length=8, block_length=8, cfg_scale=0.5)),
    ("dream", dict(steps=6, max_new_tokens=8, alg="entropy")),
    ("dream", dict(steps=4, max_new_tokens=8, alg="maskgit_plus", temperature=0.7, top_p=0.9)),
])
def test_sampler_plugins_batched_equal_one_by_one_and_count_forwards(diffusion, family, settings):
    prompts = ["hello there", "a much longer prompt than the first"]
    batched = _sample(diffusion, family, prompts, seed=5, **settings)
    assert batched.forward_passes == settings["steps"]  # one forward per step (CFG batches both halves)
    if settings.get("temperature"):  # sampling draws for the whole batch from one generator
        again = _sample(diffusion, family, prompts, seed=5, **settings)
        assert again.token_ids == batched.token_ids
        return
    for i, p in enumerate(prompts):
        assert _sample(diffusion, family, [p], **settings).token_ids[0] == batched.token_ids[i]


def test_prompt_longer_than_the_context_is_an_error(diffusion):
    with pytest.raises(RepskipError, match="longer than the model's context"):
        _sample(diffusion, "llada", ["hi"], steps=4200, gen_length=4200, block_length=4200)


def test_generate_cli_on_diffusion_models(diffusion):
    from click.testing import CliRunner

    from repskip.cli import main

    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    res = run("generate", diffusion["llada"], "--prompt", "hi", "--steps", "4", "--gen-length", "8", "--block-length", "4")
    assert res.exit_code == 0, res.output
    assert "4 forward passes, sampler llada" in res.stdout
    res = run("generate", diffusion["dream"], "--prompt", "hi", "--steps", "3", "--max-new-tokens", "6")
    assert res.exit_code == 0 and "sampler dream" in res.stdout
    for args, message in [
        (["--max-new-tokens", "5"], "'max_new_tokens' is not known to LLaDASampler"),
        (["--gen-length", "10", "--block-length", "4"], "not a multiple of block_length"),
        (["--gen-length", "8", "--block-length", "4", "--steps", "3"], "not divisible by the number of blocks"),
    ]:
        res = run("generate", diffusion["llada"], "--prompt", "hi", *args)
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert res.stderr.strip().startswith("error:") and message in res.stderr


def test_masked_sweep_measures_each_ratio_on_masked_response_tokens(diffusion):
    result = analyze(diffusion["llada"], num_samples=6, max_length=32, mask_ratios=[0.25, 1.0])
    groups = result.data["groups"]
    assert result.primary == "masked" and result.data["settings"]["mode"] == "masked"
    assert groups["masked"]["tokens"] == groups["masked@0.25"]["tokens"] + groups["masked@1"]["tokens"]
    # at ratio 1 every response token is masked, so nothing of the response stays visible then
    prompt_per_pass = groups["prompt"]["tokens"] // 2
    assert groups["masked@1"]["tokens"] + prompt_per_pass == result.data["calibration"]["tokens"]
    assert 0 < groups["masked@0.25"]["tokens"] < groups["masked@1"]["tokens"]
    assert "similarity_matrix" in groups["masked"] and "similarity_matrix" not in groups["masked@1"]


def test_sampling_mode_follows_the_reveal_schedule(diffusion):
    settings = dict(steps=4, gen_length=8, block_length=4)
    result = analyze(diffusion["llada"], num_samples=4, max_length=16, mode="sampling", sampler_settings=settings)
    g = result.data["groups"]
    # 4 prompts; 2 blocks of 4 with 2 steps each, 2 tokens revealed per step
    assert [g[f"masked@step{i}"]["tokens"] for i in range(4)] == [4 * 8, 4 * 6, 4 * 4, 4 * 2]
    assert g["current_block"]["tokens"] == 4 * (4 + 2 + 4 + 2)
    assert g["masked@block0"]["tokens"] == 4 * (8 + 6) and g["masked@block1"]["tokens"] == 4 * (4 + 2)
    assert result.data["settings"]["sampler"]["name"] == "llada"
    assert result.primary == "current_block"


def test_diffusion_modes_refuse_autoregressive_models(diffusion):
    with pytest.raises(RepskipError, match="needs a diffusion model"):
        analyze(diffusion["llama"], num_samples=2, mode="masked")


def test_recipe_kind_rule(diffusion, tmp_path):
    for_ar = Recipe(selection={"k": 1, "applies_to": "autoregressive"})
    with pytest.raises(RepskipError, match="applies to autoregressive models only.*diffusion model"):
        compress(diffusion["llada"], for_ar, tmp_path / "out")
    with pytest.raises(RepskipError, match="applies to autoregressive models only.*diffusion model"):
        resolve_recipe(for_ar, diffusion["llada"])
    assert not (tmp_path / "out").exists()


def test_analyze_cli_in_sampling_mode_writes_everything(diffusion, tmp_path):
    from click.testing import CliRunner

    from repskip.cli import main

    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["analyze", str(diffusion["dream"]), "-o", str(out), "--mode", "sampling",
                                    "--num-samples", "3", "--max-length", "12", "-k", "1", "--threshold", "-1",
                                    "--sampler-setting", "steps=4", "--sampler-setting", "max_new_tokens=6"])
    assert res.exit_code == 0, res.output
    for name in ("analysis.json", "recipe.yaml", "similarity.png", "similarity_matrix.png", "token_distance.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["settings"]["sampler"]["steps"] == 4


@pytest.mark.parametrize("family, settings", [
    ("llada", dict(steps=8, gen_length=8, block_length=4)),
    ("dream", dict(steps=6, max_new_tokens=8)),
])
def test_a_tokenizer_without_pad_token_still_batches_exactly(diffusion, family, settings):
    from repskip.sampler import get_sampler

    handle = open_model(diffusion[family])
    model = handle.family.load(handle.path)
    tok = handle.family.load_tokenizer(handle.path)
    tok.pad_token = None  # as the tokenizer.json fallback of the authors' checkpoints loads
    sampler = get_sampler(handle.family.default_sampler)
    prompts = ["hi", "a much longer prompt than the first"]
    batched = sampler.generate(model, tok, prompts, family=handle.family, **settings)
    for i, p in enumerate(prompts):
        assert sampler.generate(model, tok, [p], family=handle.family, **settings).token_ids[0] == batched.token_ids[i]


def test_an_autoregressive_sampler_is_refused_for_a_diffusion_model(diffusion):
    from click.testing import CliRunner

    from repskip.cli import main

    res = CliRunner().invoke(main, ["generate", str(diffusion["llada"]), "--prompt", "hi", "--sampler", "ar"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "sampler 'ar' is for autoregressive models; this model is diffusion: use 'llada'" in res.stderr


def test_sampling_analysis_with_guidance_measures_the_conditional_rows_only(diffusion):
    plain = dict(steps=4, gen_length=8, block_length=4)
    a = analyze(diffusion["llada"], num_samples=3, max_length=16, mode="sampling", sampler_settings=plain)
    b = analyze(diffusion["llada"], num_samples=3, max_length=16, mode="sampling", sampler_settings={**plain, "cfg_scale": 1.0})
    count = lambda r: {k: v["tokens"] for k, v in r.data["groups"].items()}  # noqa: E731
    assert count(a) == count(b)
    assert a.data["token_distance_profile"]["pairs"] == b.data["token_distance_profile"]["pairs"]
