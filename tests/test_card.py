"""Model cards (README.md) in every model folder repskip writes: compress (the ONNX export's
card is checked with its other files in test_onnx.py), heal, and verify --card; parsed by huggingface_hub; the origin of a local folder, a Hub
download and the embedded default model; a README.md repskip did not write is never replaced
or changed."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from helpers import make_checkpoint
from repskip import card, default_model
from repskip.cli import main
from repskip.compress.run import compress

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "valid.txt"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def meta(folder: Path) -> dict:
    return ModelCard.load(folder / "README.md").data.to_dict()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"schema_version": 1, "resolved": {"remove": [2, 3]}}))
    return {"root": root, "llama": make_checkpoint(root / "tiny-llama", "llama", seed=3), "recipe": recipe}


def test_compress_writes_a_card_the_hub_reads(tiny, tmp_path):
    out = tmp_path / "cut"
    compress(tiny["llama"], tiny["recipe"], out)
    text = (out / "README.md").read_text()
    assert card.is_sealed(text)
    data = meta(out)
    assert data["base_model"] == "tiny-llama" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and {"repskip", "layer-pruning"} <= set(data["tags"])
    assert "2 of 6: 2, 3" in text and "none (plain removal)" in text and "| strategy |" not in text
    assert 'from_pretrained("cut")' in text
    recipe = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe) == yaml.safe_load((out / "repskip-recipe.yaml").read_text())
    # the parameter count is the checkpoint's, less the two layers' tensors
    from repskip.engine.model import open_model

    count = lambda h: sum(__import__("math").prod(e.shape) for e in h.ckpt.tensors.values())  # noqa: E731
    assert f"{count(open_model(tiny['llama'])):,} -> {count(open_model(out)):,}" in text


def test_the_origin_of_a_hub_download_and_of_the_default_model(tiny, tmp_path):
    hub = tmp_path / "hub" / "models--SomeOrg--Tiny-Model" / "snapshots" / "0123abcd"
    shutil.copytree(tiny["llama"], hub)
    (hub / "README.md").write_text("---\nlicense: mit\ntags:\n- chat\n---\n\n# Tiny\n")
    compress(hub, tiny["recipe"], tmp_path / "from-hub")
    data = meta(tmp_path / "from-hub")
    assert data["base_model"] == "SomeOrg/Tiny-Model" and data["license"] == "mit"
    assert "chat" in data["tags"]
    assert "# Tiny" not in (tmp_path / "from-hub" / "README.md").read_text()  # the source's own card stays behind

    cached = tmp_path / "cache" / default_model.NAME
    shutil.copytree(tiny["llama"], cached)
    (cached / default_model.DONE_MARKER).write_text(default_model.PACKAGE + "\n")
    compress(cached, tiny["recipe"], tmp_path / "from-default")
    data = meta(tmp_path / "from-default")
    assert data["base_model"] == default_model.HUB_ID and data["license"] == default_model.LICENSE
    assert "Q4_1 GGUF" in (tmp_path / "from-default" / "README.md").read_text()


def test_a_readme_someone_else_wrote_or_edited_is_never_replaced(tiny, tmp_path):
    out = tmp_path / "cut"
    compress(tiny["llama"], tiny["recipe"], out)
    first = (out / "README.md").read_text()
    compress(tiny["llama"], tiny["recipe"], out, force=True)  # repskip's own card, unchanged: rewritten
    assert card.is_sealed((out / "README.md").read_text())
    edited = first.replace("# cut", "# cut\n\nMy notes on this model.")
    (out / "README.md").write_text(edited)
    compress(tiny["llama"], tiny["recipe"], out, force=True)
    assert (out / "README.md").read_text() == edited and (out / "model.safetensors").is_file()
    # verify --card refuses to touch it, in one line, before any work
    res = run("verify", tiny["llama"], out, "--bench", "perplexity", "--card", "-o", tmp_path / "v")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "did not write or that was edited since" in res.stderr and not (tmp_path / "v").exists()
    assert (out / "README.md").read_text() == edited


@pytest.mark.skipif(not WIKI.is_file(), reason="needs ../shared/data/wikitext2")
def test_verify_adds_its_retention_table_to_the_card(tiny, tmp_path):
    out = tmp_path / "cut"
    recipe = tmp_path / "chosen.yaml"  # a recipe an analysis chose says how
    recipe.write_text(yaml.safe_dump({"schema_version": 1, "selection": {"strategy": "block-influence", "k": 2},
                                      "resolved": {"remove": [2, 3]}}))
    compress(tiny["llama"], recipe, out)
    assert "| strategy | block-influence, k=2 |" in (out / "README.md").read_text()
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(WIKI.read_text()[:20000])
    args = ["verify", tiny["llama"], out, "--bench", "perplexity", "--data", f"perplexity={wiki}", "--limit", "3",
            "--speed-repeats", "0", "-o", tmp_path / "v"]
    res = run(*args, "--card")
    assert res.exit_code == 0, res.output
    text = (out / "README.md").read_text()
    assert card.is_sealed(text) and meta(out)["base_model"] == "tiny-llama"
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    ppl = report["benchmarks"]["perplexity"]
    row = next(line for line in text.splitlines() if line.startswith("| perplexity |"))
    assert f"{ppl['retention']:.3f}" in row and f"{ppl['base']:.4g}" in row
    assert text.count("<!-- repskip:verify -->") == 1
    again = run(*args, "--card", "--bench", "perplexity")  # a second run replaces the section
    assert again.exit_code == 0 and (out / "README.md").read_text().count("<!-- repskip:verify -->") == 1
    res = run("verify", tiny["llama"], "--recipe", tiny["recipe"], "--bench", "perplexity", "--card")
    assert res.exit_code == 1 and "not --recipe" in res.stderr


@pytest.mark.skipif(not WIKI.is_file(), reason="needs ../shared/data/wikitext2")
def test_heal_adds_its_training_to_the_card_of_the_model_it_healed(tiny, tmp_path):
    pytest.importorskip("peft")
    from repskip.train.heal import HealSettings, heal

    cut = tmp_path / "cut"
    compress(tiny["llama"], tiny["recipe"], cut)
    data = tmp_path / "data.txt"
    data.write_text(WIKI.read_text()[:20000])
    heal(cut, tmp_path / "healed", data=str(data), teacher=tiny["llama"],
         settings=HealSettings(steps=2, seq_len=32, batch_size=2, eval_sequences=4))
    text = (tmp_path / "healed" / "README.md").read_text()
    assert card.is_sealed(text)
    data_meta = meta(tmp_path / "healed")
    assert data_meta["base_model"] == "tiny-llama" and "healed" in data_meta["tags"]
    assert "<!-- repskip:compress -->" in text and "<!-- repskip:heal -->" in text
    assert 'from_pretrained("healed")' in text and 'from_pretrained("cut")' not in text
    assert "lora on layers [1, 2]" in text


@pytest.mark.parametrize("doc, target, name, onnx", [("quickstart.md", "exported/load.py", "card-demo", False),
                                                     ("onnx.md", "exported/deploy.py", "tiny-onnx", True)])
def test_the_tutorials_run_the_cards_own_snippets(doc, target, name, onnx):
    """The docs' tutorials run (tests/test_docs.py) the loading code a card gives, as the card
    gives it: transformers for a safetensors folder, onnxruntime-genai for an ONNX one."""
    text = (Path(__file__).resolve().parents[1] / "docs" / doc).read_text()
    block = text.split(f"<!-- docs-test: file {target} -->\n```python\n", 1)[1].split("```", 1)[0]
    snippets = card._how_to_load(name, True, onnx, genai=True).split("```python\n")[1:]
    assert block in [s.split("```", 1)[0] for s in snippets]
