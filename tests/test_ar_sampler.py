from repskip.pipeline import open_model
from repskip.sampler import get_sampler


def test_stop_strings_end_generation_early_at_the_same_text(tiny):
    handle = open_model(tiny["llama"])
    model, tok = handle.family.load(handle.path), handle.family.load_tokenizer(handle.path)
    sampler = get_sampler("ar", handle.family)
    free = sampler.generate(model, tok, ["x"], family=handle.family, max_new_tokens=40)
    text = free.texts[0]
    stop = next(text[i : i + 2] for i in range(5, len(text) - 1) if text[i : i + 2].isprintable() and text[i : i + 2].strip())
    cut = sampler.generate(model, tok, ["x"], family=handle.family, max_new_tokens=40, stop=[stop])
    assert cut.texts[0] == text[: text.index(stop) + len(stop)]
    assert cut.forward_passes < free.forward_passes


def test_greedy_batches_equal_single_prompts(tiny):
    handle = open_model(tiny["qwen2"])
    model, tok = handle.family.load(handle.path), handle.family.load_tokenizer(handle.path)
    sampler = get_sampler("ar", handle.family)
    prompts = ["a short one", "and a considerably longer prompt here"]
    batched = sampler.generate(model, tok, prompts, max_new_tokens=12).token_ids
    assert batched == [sampler.generate(model, tok, [p], max_new_tokens=12).token_ids[0] for p in prompts]
