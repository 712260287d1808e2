"""A checkpoint whose config.json and weights disagree is refused when it is opened: one line
naming the folder, the first mismatch and the fix, exit code 1, no traceback, nothing written.
Every consistent checkpoint of every built-in family passes, and its expected tensors are
exactly what transformers (or the diffusion layouts) put on disk."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import (
    FAMILIES,
    dream_from_qwen2,
    edit_config,
    edit_safetensors,
    folder_snapshot,
    llada_from_llama,
    make_checkpoint,
)
from repskip import family as family_mod
from repskip.checkpoint import INDEX_NAME, open_checkpoint, shard_name_problem
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.consistency import check_checkpoint
from repskip.family import Dim, Family, slice_layer_config
from repskip.flops import hf_geometry
from repskip.pipeline import open_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "paper-k2.yaml"


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency-diffusion")
    llama = make_checkpoint(root / "llama", "llama", seed=21, tie_word_embeddings=False)
    qwen2 = make_checkpoint(root / "qwen2", "qwen2", seed=22)
    return {"llada": llada_from_llama(llama, root / "llada"), "dream": dream_from_qwen2(qwen2, root / "dream")}


# Config flags beyond the `tiny` layouts: each changes which tensors transformers writes.
VARIANTS = {
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral-head-dim": ("mistral", dict(head_dim=32)),  # head_dim != hidden / heads
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency-variants")
    return {name: make_checkpoint(root / name, fam, seed=30 + i, **flags)
            for i, (name, (fam, flags)) in enumerate(VARIANTS.items())}


def header_shapes(path):
    return {name: entry.shape for name, entry in open_checkpoint(path).tensors.items()}


# --- every consistent checkpoint passes -------------------------------------------------
def test_every_built_in_tiny_checkpoint_passes_and_matches_its_expected_tensors(tiny, tiny_sharded, diffusion, variants):
    paths = {**tiny, "sharded": tiny_sharded, **diffusion, **variants}
    for label, path in paths.items():
        handle = open_model(path)  # runs the checks
        expected = handle.family.expected_tensors(handle.ckpt.config)
        assert expected == header_shapes(path), label
    assert set(FAMILIES) <= set(paths) and len(open_checkpoint(tiny_sharded).files) > 2


def test_variant_flags_change_the_expected_tensors(variants):
    shapes = header_shapes(variants["llama-biases"])
    assert shapes["model.layers.0.self_attn.o_proj.bias"] == (64,)
    assert shapes["model.layers.0.mlp.down_proj.bias"] == (64,)
    assert "lm_head.weight" in shapes
    shapes = header_shapes(variants["qwen3-attention-bias"])
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (64,) and "lm_head.weight" not in shapes
    assert header_shapes(variants["mistral-head-dim"])["model.layers.0.self_attn.q_proj.weight"] == (128, 64)


def test_diffusion_expected_tensors_are_what_the_loader_fills(diffusion):
    from repskip_diffusion.model import BidirectionalDecoder

    for path in diffusion.values():
        handle = open_model(path)
        fam, config = handle.family, handle.ckpt.config
        with torch.device("meta"):
            model = BidirectionalDecoder(fam.spec(config))
        params = {fam.disk_name(n): tuple(p.shape) for n, p in model.named_parameters()}
        assert params == fam.expected_tensors(config)


def test_optional_tensors_may_be_present(tiny, tmp_path):
    """A tied lm_head saved anyway, and legacy rotary inv_freq buffers, are accepted."""
    bad = tmp_path / "llama"
    shutil.copytree(tiny["llama"], bad)

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        for i in range(6):
            t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    edit_safetensors(bad / "model.safetensors", add)
    open_model(bad)

    def wrong(t):
        t["lm_head.weight"] = torch.zeros(320, 32)

    edit_safetensors(bad / "model.safetensors", wrong)
    with pytest.raises(RepskipError, match=r"lm_head.weight has shape \[320, 32\]; config.json implies \[320, 64\]"):
        open_model(bad)


def test_a_hub_cache_snapshot_of_symlinks_passes(tiny_sharded, tmp_path):
    """Hub snapshots are links into blobs/ outside the folder: the index check is lexical."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_sharded.iterdir())):
        shutil.copyfile(f, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / f.name)
    handle = open_model(snap)
    assert handle.num_layers == 6 and len(handle.ckpt.files) > 2


@pytest.mark.parametrize("name, problem", [
    ("model-00001-of-00002.safetensors", None),
    ("./model.safetensors", None),
    ("weights/model.safetensors", None),
    ("../outside.safetensors", "outside the checkpoint folder"),
    ("a/../../outside.safetensors", "outside the checkpoint folder"),
    ("a/../model.safetensors", "outside the checkpoint folder"),
    ("/tmp/model.safetensors", "outside the checkpoint folder"),
    ("..\\outside.safetensors", "outside the checkpoint folder"),
    ("C:\\weights\\model.safetensors", "outside the checkpoint folder"),
    ("", "not a file name"),
    (".", "not a file name"),
    ("a\x00b", "not a file name"),
    (3, "not a file name"),
    (None, "not a file name"),
])
def test_shard_names_are_checked_lexically(name, problem):
    assert shard_name_problem(name) == problem


# --- each inconsistency is refused by every command ------------------------------------
def _set_layers(n):
    return lambda p, outside: edit_config(p, num_hidden_layers=n)


def _drop(name):
    return lambda p, outside: edit_safetensors(p / "model.safetensors", lambda t: t.pop(name))


def _put(name, shape):
    def damage(p, outside):
        edit_safetensors(p / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(shape)))
    return damage


def _index(weight_map):
    """Move the weights next to the checkpoint and write an index pointing at them."""
    def damage(p, outside):
        names = list(header_shapes(p))
        shutil.move(p / "model.safetensors", outside)
        target = weight_map(outside)
        wm = {n: target for n in names} if isinstance(target, str) else target
        (p / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return damage


CASES = {
    "more-layers": ("llama", _set_layers(8),
                    "config.json declares 8 layers (num_hidden_layers) but the weights hold layers 0-5"),
    "fewer-layers": ("llama", _set_layers(4),
                     "config.json declares 4 layers (num_hidden_layers) but the weights hold layers 0-5"),
    "layer-missing-a-tensor": ("qwen2", _drop("model.layers.3.mlp.down_proj.weight"),
                               "tensor model.layers.3.mlp.down_proj.weight is missing"),
    "hidden-size-changed": ("qwen2", lambda p, outside: edit_config(p, hidden_size=96),
                            "tensor model.embed_tokens.weight has shape [320, 64]; config.json implies "
                            "[320, 96] (vocab_size x hidden_size)"),
    "tensor-wrong-shape": ("llama", _put("model.layers.3.mlp.down_proj.weight", (64, 128)),
                           "tensor model.layers.3.mlp.down_proj.weight has shape [64, 128]; config.json "
                           "implies [64, 160] (hidden_size x intermediate_size)"),
    "extra-tensor": ("qwen2", _put("model.vision_tower.weight", (4, 4)),
                     "tensor model.vision_tower.weight is not part of the model config.json describes (hf-decoder layout)"),
    "extra-tensor-in-one-layer": ("qwen2", _put("model.layers.2.self_attn.gate.weight", (4,)),
                                  "tensor model.layers.2.self_attn.gate.weight is not part of the model config.json "
                                  "describes (hf-decoder layout)"),
    "index-to-parent": ("qwen2", _index(lambda outside: "../outside.safetensors"),
                        f"{INDEX_NAME} maps tensors to ../outside.safetensors, outside the checkpoint folder"),
    "index-to-absolute-path": ("qwen2", _index(lambda outside: str(outside)),
                               "outside.safetensors, outside the checkpoint folder"),
    "weight-map-not-a-dict": ("qwen2", _index(lambda outside: ["outside.safetensors"]),
                              f"the weight_map of {INDEX_NAME} is a JSON array, not an object"),
}


def assert_refused(result, folder, message):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert message in errors[0], errors[0]
    assert str(folder) in errors[0] and "re-download" in errors[0], errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_inconsistent_checkpoint_is_refused_by_every_command(tiny, tmp_path, case):
    source, damage, message = CASES[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny[source], ckpt)
    damage(ckpt, tmp_path / "outside.safetensors")
    before = folder_snapshot(tmp_path)
    runner = CliRunner()
    commands = {
        "analyze": ["analyze", ckpt, "-o", tmp_path / "runs", "--num-samples", "2", "--max-length", "16"],
        "compress": ["compress", ckpt, "--recipe", RECIPE, "-o", tmp_path / "out"],
        "generate": ["generate", ckpt, "--prompt", "hello", "--max-new-tokens", "2"],
        "flops": ["flops", ckpt, "--remove", "1"],
    }
    for name, args in commands.items():
        result = runner.invoke(main, [str(a) for a in args])
        assert_refused(result, ckpt, message)
    assert folder_snapshot(tmp_path) == before  # no output folder, the input untouched


@pytest.mark.parametrize("family, change, message", [
    ("llada", dict(n_layers=5), "config.json declares 5 layers (n_layers) but the weights hold layers 0-5"),
    ("llada", dict(d_model=96), "tensor model.transformer.wte.weight has shape [320, 64]; config.json implies "
                                "[320, 96] (embedding_size x d_model)"),
    ("dream", dict(num_key_value_heads=4), "tensor model.layers.0.self_attn.k_proj.weight has shape [32, 64]; "
                                           "config.json implies [64, 64] (num_key_value_heads*(hidden_size/"
                                           "num_attention_heads) x hidden_size)"),
    ("dream", dict(tie_word_embeddings=True), "tensor lm_head.weight is not part of the model config.json describes (dream layout)"),
])
def test_inconsistent_diffusion_checkpoint_is_refused(diffusion, tmp_path, family, change, message):
    bad = tmp_path / family
    shutil.copytree(diffusion[family], bad)
    edit_config(bad, **change)
    with pytest.raises(RepskipError) as err:
        open_model(bad)
    text = str(err.value)
    assert message in text and str(bad) in text and "\n" not in text


def test_a_config_key_the_layout_needs_is_named(tiny, tmp_path):
    bad = tmp_path / "qwen2"
    shutil.copytree(tiny["qwen2"], bad)
    edit_config(bad, intermediate_size=None)
    # transformers fills in its default, which the weights do not have: the message says so
    with pytest.raises(RepskipError, match=r"implies \[22016, 64\] \(intermediate_size, absent from config.json: "
                                           r"default 22016 x hidden_size\)"):
        open_model(bad)


# --- a third-party family without expected_tensors --------------------------------------
class LayersOnlyFamily(Family):
    """A plugin that implements only the required methods: no expected_tensors."""

    def matches(self, config):
        return config.get("model_type") == "qwen2"

    def num_layers(self, config):
        return int(config["num_hidden_layers"])

    def layer_prefix(self, config):
        return "model.layers."

    def rewrite_config(self, config, kept):
        return slice_layer_config(config, kept, "num_hidden_layers")

    def geometry(self, config):
        return hf_geometry(config)

    def load(self, path, dtype=None, device="cpu", device_map=None):
        raise NotImplementedError

    def load_tokenizer(self, path):
        raise NotImplementedError

    def decoder_layers(self, model):
        raise NotImplementedError

    def remove_layers(self, model, kept):
        raise NotImplementedError


def test_a_family_without_expected_tensors_gets_the_generic_checks(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(family_mod, "families", lambda: {"layers-only": LayersOnlyFamily()})
    assert LayersOnlyFamily().expected_tensors({}) is None
    assert open_model(tiny["qwen2"]).family_name == "layers-only"

    extra = tmp_path / "extra"  # outside the layers, nothing is known: accepted
    shutil.copytree(tiny["qwen2"], extra)
    _put("model.vision_tower.weight", (4, 4))(extra, None)
    assert open_model(extra).num_layers == 6

    # with no layout to hold them to, layers must at least hold the same tensors as each other
    generic = {"extra-tensor-in-one-layer": "tensor model.layers.2.self_attn.gate.weight has no counterpart in the "
                                            "other layers",
               "layer-missing-a-tensor": "tensor model.layers.3.mlp.down_proj.weight is missing, though 5 of the 6 "
                                         "layers hold mlp.down_proj.weight"}
    for case in ("more-layers", "fewer-layers", "layer-missing-a-tensor", "extra-tensor-in-one-layer"):
        bad = tmp_path / case
        shutil.copytree(tiny["qwen2"], bad)
        CASES[case][1](bad, None)
        with pytest.raises(RepskipError) as err:
            open_model(bad)
        assert generic.get(case, CASES[case][2]) in str(err.value)


def test_layer_names_without_an_index_and_gaps_are_refused(tiny, tmp_path):
    fam = open_model(tiny["qwen2"]).family
    bad = tmp_path / "gap"
    shutil.copytree(tiny["qwen2"], bad)
    edit_safetensors(bad / "model.safetensors",
                     lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.2.")])
    with pytest.raises(RepskipError, match=r"declares 6 layers \(num_hidden_layers\) but the weights hold layers 0-1, 3-5"):
        check_checkpoint(open_checkpoint(bad), fam)
    _put("model.layers.x.weight", (4,))(bad, None)
    with pytest.raises(RepskipError, match="lies under the layer prefix model.layers. but names no layer index"):
        check_checkpoint(open_checkpoint(bad), fam)


def test_dim_is_an_int_that_names_its_source():
    d = Dim(64, "hidden_size")
    assert d == 64 and (d, 3) == (64, 3) and repr(d) == "64" and d.source == "hidden_size"
    import pickle

    assert pickle.loads(pickle.dumps(d)).source == "hidden_size"
