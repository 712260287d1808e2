"""The AR-vs-diffusion study's trained diffusion checkpoint as a fixture
(bench/ar_vs_diffusion.py): it loads through repskip's LLaDA family, its sampler writes text,
and that text is far more likely than what a random model of the same architecture writes.

The checkpoint is the study's own: with REPSKIP_STUDY_WORK set to a study's --work folder,
that run's model (the full-size one of docs/study.md); otherwise the study's command trains
a small one here (--stop-after train, a couple of minutes on 2 cores).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repskip.pipeline import open_model
from repskip.sampler import get_sampler
from repskip.verify.likelihood import masked_diffusion_nll

pytestmark = pytest.mark.slow
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "bench" / "ar_vs_diffusion.py"
sys.path.insert(0, str(STUDY.parent))
from ar_vs_diffusion import heldout_paragraphs  # noqa: E402
SMALL = ["--layers", "2", "--width", "128", "--heads", "4", "--ffn", "320", "--vocab", "1024", "--steps", "300",
         "--batch-size", "16", "--seq-len", "64", "--lr", "4e-3"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    given = os.environ.get("REPSKIP_STUDY_WORK")
    if given:
        work = Path(given).expanduser()
        assert (work / "models" / "diffusion" / "heal.json").is_file(), f"{work} holds no trained study model"
        return work
    work = tmp_path_factory.mktemp("study")
    done = subprocess.run([sys.executable, str(STUDY), "--work", str(work), "--stop-after", "train", "--kinds",
                           "diffusion", *SMALL], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


def per_token_nll(model, family, rows: list[list[int]], mask_id: int) -> float:
    total, count = 0.0, 0
    for i, row in enumerate(rows):
        nll, n = masked_diffusion_nll(model, family, torch.tensor([row]), mask_id, samples=8, seed=i)
        total, count = total + nll, count + n
    return total / count


def test_the_trained_diffusion_model_samples_text_far_likelier_than_a_random_model_does(study):
    trained_handle = open_model(study / "models" / "diffusion")
    random_handle = open_model(study / "init" / "diffusion")  # the same architecture, before training
    assert trained_handle.family_name == "llada" and random_handle.family_name == "llada"
    family = trained_handle.family
    tokenizer = family.load_tokenizer(trained_handle.path)
    mask_id = family.mask_token_id(trained_handle.ckpt.config)
    trained, random = trained_handle.load("float32"), random_handle.load("float32")

    blocks = heldout_paragraphs(study, 8)
    held = [tokenizer(b)["input_ids"][:96] for b in blocks]
    prompts = [tokenizer.decode(ids[:16]) for ids in held]
    sampler = get_sampler("llada", family)
    # sampled at temperature 1 (seeded): greedy decoding of a model this small repeats its most
    # frequent token, which says little about what it learnt
    settings = {"gen_length": 32, "steps": 32, "block_length": 32, "temperature": 1.0}
    ours = sampler.generate(trained, tokenizer, prompts, family=family, seed=0, **settings)
    theirs = sampler.generate(random, tokenizer, prompts, family=family, seed=0, **settings)
    assert ours.texts and all(isinstance(t, str) for t in ours.texts)
    produced = [t for ids in ours.token_ids for t in ids]
    assert len(produced) >= 8 * 8 and len(set(produced)) >= 16, ours.texts  # text, not one token repeated

    # held-out text: the trained model's masked-token loss is far below a random model's (by
    # 0.7 nats a token: half the perplexity; the small model trained here reaches about 1)
    held_trained = per_token_nll(trained, family, held, mask_id)
    held_random = per_token_nll(random, family, held, mask_id)
    assert held_trained < held_random - 0.7, (held_trained, held_random)

    # its samples: by the trained model's own measure far likelier than a random model's samples
    def with_prompt(gen):
        return [tokenizer(p)["input_ids"] + ids for p, ids in zip(prompts, gen.token_ids) if ids]

    ours_nll = per_token_nll(trained, family, with_prompt(ours), mask_id)
    theirs_nll = per_token_nll(trained, family, with_prompt(theirs), mask_id)
    assert ours_nll < theirs_nll - 0.7, (ours_nll, theirs_nll)
