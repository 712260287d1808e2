"""Linear repair: the least-squares maps, their fold into weights (file-level and in memory,
which must agree), exact recovery where the removed layer is linear, every family, and the
bad inputs around the maps file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import dream_from_qwen2, llada_from_llama, make_checkpoint
from repskip import pipeline
from repskip.analyze.objective import Objective
from repskip.analyze.surgery import Surgery
from repskip.cli import main
from repskip.errors import RepskipError
from repskip.family import Family
from repskip.recipe import load as load_recipe
from repskip.repair.fit import fit_linear, fold_in_memory
from repskip.repair.linear import LeastSquares, Run, fold_bytes, removed_runs, token_weights


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr


# --- the math ----------------------------------------------------------------------------------
def test_runs_and_their_anchors():
    assert removed_runs([5, 2, 3, 9], 12) == [Run(1, 2, 3), Run(4, 5, 5), Run(8, 9, 9)]
    with pytest.raises(RepskipError, match="layer 0 has none"):
        removed_runs([0, 1], 6)


def test_least_squares_recovers_an_exact_map_from_streamed_batches():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(16, 16))
    ls = LeastSquares(16)
    for _ in range(5):  # streamed: the sums, not the tokens, are kept
        m = rng.normal(size=(200, 16))
        ls.add(m, m @ true)
    assert np.allclose(ls.solve(1e-12), true, atol=1e-8)
    assert ls.residual(ls.solve(1e-12)) < 1e-12 and ls.residual(np.eye(16)) == pytest.approx(1.0)
    assert np.allclose(ls.solve(1e9), np.eye(16), atol=1e-3)  # a large ridge means no repair



def test_the_fit_does_not_depend_on_the_basis():
    # docs/benchmarks.md: LinearPatch's Hadamard rotation cannot change this fit. Rotating the
    # states by any orthogonal Q (a Hadamard matrix is one) gives Q^T T Q, the same map in the
    # new basis: the token weights (norms), the ridge (a trace) and the shrink target (I) are
    # all basis-free. Massive activations on a few tokens are included, as in real models.
    rng = np.random.default_rng(1)
    m, y, r = (rng.normal(size=(3000, 32)) for _ in range(3))
    m[:4] *= 100.0
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))

    def fit(m, y, r):
        ls = LeastSquares(32)
        ls.add(m, y - r, token_weights(y))
        return ls.solve(1e-3)

    plain, rotated = fit(m, y, r), fit(m @ q, y @ q, r @ q)
    assert not np.allclose(plain, np.eye(32), atol=1e-3)  # a map that does something
    assert np.allclose(q @ rotated @ q.T, plain, atol=1e-10)

@pytest.mark.parametrize("dtype, torch_dtype", [("F32", torch.float32), ("F16", torch.float16),
                                                ("BF16", torch.bfloat16), ("F64", torch.float64)])
def test_the_file_level_fold_rounds_exactly_as_torch(dtype, torch_dtype):
    torch.manual_seed(0)
    w = torch.randn(24, 40).to(torch_dtype)
    t = np.random.default_rng(1).normal(size=(24, 24)).astype(np.float32).astype(np.float64)
    raw = w.view(torch.uint16).numpy().tobytes() if torch_dtype == torch.bfloat16 else w.numpy().tobytes()
    folded = fold_bytes(raw, dtype, (24, 40), t)
    want = torch.as_tensor(t).T @ w.double()
    want = want if torch_dtype == torch.float64 else want.to(torch.float32).to(torch_dtype)
    want_raw = want.view(torch.uint16).numpy().tobytes() if torch_dtype == torch.bfloat16 else want.numpy().tobytes()
    assert folded == want_raw
    with pytest.raises(RepskipError, match="I8"):
        fold_bytes(b"\0" * 4, "I8", (2, 2), np.eye(2))


# --- exact recovery: a toy family whose removed layer is linear ----------------------------------
class ToyLayer(torch.nn.Module):
    """h -> keep * h + down(relu(up(h))) (keep = 0: no residual) or, linear, h @ A."""

    def __init__(self, hidden: int, keep: float = 1.0, linear: torch.Tensor | None = None):
        super().__init__()
        self.keep = keep
        self.register_buffer("linear", linear)
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(hidden, 2 * hidden, bias=False)
        self.mlp.down_proj = torch.nn.Linear(2 * hidden, hidden, bias=True)

    def forward(self, h):
        if self.linear is not None:
            return h @ self.linear
        return self.keep * h + self.mlp.down_proj(torch.relu(self.mlp.up_proj(h)))


class ToyModel(torch.nn.Module):
    def __init__(self, vocab=50, hidden=12, layers=5, linear_at=2):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(vocab, hidden)
        a = torch.eye(hidden) + 0.3 * torch.randn(hidden, hidden)
        # the anchor (linear_at - 1) drops its residual, so its output is its MLP's alone and the
        # linear layer after it is exactly m @ A: a map the repair can represent
        self.layers = torch.nn.ModuleList(
            ToyLayer(hidden, keep=0.0 if i == linear_at - 1 else 1.0, linear=a if i == linear_at else None)
            for i in range(layers))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids, mask=None):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class ToyFamily:
    generative_kind = "autoregressive"

    def decoder_layers(self, model):
        return model.layers

    def mlp_output_projection(self, layer):
        return layer.mlp.down_proj

    mlp_output_parameters = Family.mlp_output_parameters  # its weight, output axis 0

    def logits(self, model, ids, mask):
        return model(ids, mask)

    @staticmethod
    def layer_output(output):
        return output


def test_a_linear_removed_layer_is_recovered_to_numerical_precision():
    model, fam = ToyModel().double().eval(), ToyFamily()
    ids = torch.randint(0, 50, (6, 9))
    batches = lambda: [(ids, torch.ones_like(ids))]  # noqa: E731
    fit = fit_linear(model, fam, batches, Objective(fam), [2], 5, ridge=1e-12)
    assert fit.residual[1] < 1e-20
    assert np.allclose(fit.maps[1], model.layers[2].linear.numpy(), atol=1e-6)
    with torch.no_grad():
        full = model(ids)
        fold_in_memory(model, fam, {1: fit.maps[1].astype(np.float64)})
        model.layers = torch.nn.ModuleList(model.layers[i] for i in (0, 1, 3, 4))
        assert (model(ids) - full).abs().max() < 1e-5  # the maps file's float32 rounding is the limit


# --- real families: compress equals the in-memory repair -----------------------------------------
@pytest.fixture(scope="module")
def families(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("repair-families")
    llama = make_checkpoint(root / "llama-untied", "llama", seed=21, tie_word_embeddings=False)
    biased = make_checkpoint(root / "llama-bias", "llama", seed=22, mlp_bias=True)
    return {**tiny, "llama-mlp-bias": biased, "llada": llada_from_llama(llama, root / "llada"),
            "dream": dream_from_qwen2(tiny["qwen2"], root / "dream")}


@pytest.mark.parametrize("name", ["qwen2", "llama", "qwen3", "mistral", "llama-mlp-bias", "llada", "dream"])
def test_repaired_checkpoint_equals_the_in_memory_repair(families, tmp_path, name):
    model = families[name]
    out = tmp_path / "runs"
    res = run("analyze", model, "-o", out, "--strategy", "block-influence", "-k", "2", "--repair", "linear",
              "--num-samples", "8", "--max-length", "32")
    assert res.exit_code == 0, res.output
    recipe = load_recipe(out / "recipe.yaml")
    repair = recipe.resolved.repair
    assert repair is not None and (out / repair.file).is_file() and len(repair.maps) >= 1
    assert all(m.residual is not None and m.residual < 1.0 for m in repair.maps)  # better than plain removal
    exported = tmp_path / "exported"
    assert run("compress", model, "--recipe", out / "recipe.yaml", "-o", exported).exit_code == 0
    plain = tmp_path / "plain"
    plain_recipe = tmp_path / "plain.yaml"
    plain_recipe.write_text(f"schema_version: 1\nresolved: {{remove: {recipe.resolved.remove}}}\n")
    assert run("compress", model, "--recipe", plain_recipe, "-o", plain).exit_code == 0

    handle = pipeline.open_model(model)
    memory = handle.load()
    fold_in_memory(memory, handle.family, recipe.repair_maps(handle.family.hidden_size(handle.ckpt.config)))
    handle.family.remove_layers(memory, [i for i in range(handle.num_layers) if i not in recipe.resolved.remove])
    loaded = pipeline.open_model(exported).load()
    ids = torch.randint(3, 300, (2, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        diff = (handle.family.logits(loaded, ids, mask) - handle.family.logits(memory, ids, mask)).abs().max()
    assert diff < 1e-5
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(loaded) == count(pipeline.open_model(plain).load())
    if name not in ("llada", "dream"):  # plain transformers loads it, silently
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        with _no_warnings():
            AutoModelForCausalLM.from_pretrained(exported)
    written = load_recipe(exported / "repskip-recipe.yaml").resolved.repair
    assert written.file is None and written.sha256 == repair.sha256  # the record, not the maps


class _no_warnings:
    """No Python warning and no transformers log line at warning level or above."""

    def __enter__(self):
        import logging
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        self._records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = self._records.append
        self._handler = handler
        logging.getLogger("transformers").addHandler(handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("transformers").removeHandler(self._handler)
        self._catch.__exit__(*exc)
        relevant = [w for w in self._caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
        assert not relevant, [str(w.message) for w in relevant]
        assert not self._records, [r.getMessage() for r in self._records]


def test_surgery_equals_the_folded_and_pruned_model(tiny):
    """The hooks the search and the fits run on give the logits the compressed model gives."""
    handle = pipeline.open_model(tiny["qwen2"])
    model, fam = handle.load(), handle.family
    t = torch.eye(64) + 0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad(), Surgery(model, fam) as s:
        s.set(skip=[2, 3], maps={1: t})
        hooked = fam.logits(model, ids, torch.ones_like(ids))
    with torch.no_grad():
        fold_in_memory(model, fam, {1: t.double().numpy()})
        fam.remove_layers(model, [0, 1, 4, 5])
        pruned = fam.logits(model, ids, torch.ones_like(ids))
    assert (hooked - pruned).abs().max() < 1e-5


# --- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def repaired(tiny, tmp_path):
    out = tmp_path / "runs"
    res = run("analyze", tiny["llama"], "-o", out, "--strategy", "block-influence", "-k", "2", "--repair", "linear",
              "--num-samples", "4", "--max-length", "16")
    assert res.exit_code == 0, res.output
    return out


def test_a_maps_file_that_does_not_match_the_recipe(tiny, repaired, tmp_path):
    maps = repaired / "repair.safetensors"
    maps.write_bytes(maps.read_bytes()[:-4] + b"\0\0\0\0")
    one_line_error(run("compress", tiny["llama"], "--recipe", repaired / "recipe.yaml", "-o", tmp_path / "x"),
                   "not the recipe's")
    maps.unlink()
    one_line_error(run("compress", tiny["llama"], "--recipe", repaired / "recipe.yaml", "-o", tmp_path / "x"),
                   "repair maps")
    one_line_error(run("verify", tiny["llama"], "--recipe", repaired / "recipe.yaml", "--bench", "perplexity",
                       "--data", f"perplexity={repaired / 'recipe.yaml'}", "-o", tmp_path / "v"), "repair maps")
    assert not (tmp_path / "x").exists()


def test_an_exported_recipe_keeps_the_record_but_cannot_be_reapplied(tiny, repaired, tmp_path):
    exported = tmp_path / "exported"
    assert run("compress", tiny["llama"], "--recipe", repaired / "recipe.yaml", "-o", exported).exit_code == 0
    one_line_error(run("compress", tiny["llama"], "--recipe", exported / "repskip-recipe.yaml", "-o", tmp_path / "y"),
                   "not its maps file")


def test_an_onnx_export_carries_the_same_repair(tiny, repaired, tmp_path):
    """The ONNX graph of a repaired recipe computes the repaired safetensors export's logits,
    not plain removal's."""
    recipe = repaired / "recipe.yaml"
    for fmt in ("onnx", "safetensors"):
        res = run("compress", tiny["llama"], "--recipe", recipe, "-o", tmp_path / fmt, "--format", fmt)
        assert res.exit_code == 0, res.output
    plain_recipe = tmp_path / "plain.yaml"
    plain_recipe.write_text(f"schema_version: 1\nresolved: {{remove: {load_recipe(recipe).resolved.remove}}}\n")
    assert run("compress", tiny["llama"], "--recipe", plain_recipe, "-o", tmp_path / "plain").exit_code == 0

    on_ort = pipeline.open_model(tmp_path / "onnx", allow_onnx=True)
    fam = on_ort.family
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ort = fam.logits(on_ort.load(provider="cpu"), ids, mask)
        repaired_pt = fam.logits(pipeline.open_model(tmp_path / "safetensors").load(), ids, mask)
        plain_pt = fam.logits(pipeline.open_model(tmp_path / "plain").load(), ids, mask)
    assert (plain_pt - repaired_pt).abs().max() > 1e-2  # the maps change the model
    assert (ort - repaired_pt).abs().max() < 1e-4


def test_repair_on_a_family_that_declares_no_projection(tiny, tmp_path, monkeypatch):
    from repskip_hf.family import HFDecoderFamily

    # what a family plugin that says nothing about the repair gets
    monkeypatch.setattr(HFDecoderFamily, "repair_problem", Family.repair_problem)
    one_line_error(run("analyze", tiny["llama"], "-o", tmp_path / "r", "--repair", "linear", "-k", "1",
                       "--strategy", "block-influence"), "declares no MLP output projection")
    assert not (tmp_path / "r").exists()


def test_repair_cannot_anchor_a_run_at_layer_zero(tiny, tmp_path):
    one_line_error(run("analyze", tiny["llama"], "-o", tmp_path / "r", "--repair", "linear", "-k", "2",
                       "--strategy", "angular-block", "--no-protect-ends", "--protect", "2,3,4,5",
                       "--num-samples", "4", "--max-length", "16"), "layer 0 has none")


def test_a_fit_on_few_tokens_is_flagged(tiny, repaired, tmp_path, monkeypatch):
    # 4 x 16 tokens for maps of the tiny model's hidden size: warned, on one line (every time:
    # Python shows a warning once per place unless told otherwise, and the fixture warned first)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        res = run("analyze", tiny["llama"], "-o", tmp_path / "a", "--strategy", "block-influence", "-k", "2",
                  "--repair", "linear", "--num-samples", "4", "--max-length", "16")
        assert res.exit_code == 0 and "warning: the linear repair was fitted on" in res.stderr, res.stderr
        monkeypatch.setattr(pipeline, "TOKENS_PER_HIDDEN", 0)
        res = run("analyze", tiny["llama"], "-o", tmp_path / "b", "--strategy", "block-influence", "-k", "2",
                  "--repair", "linear", "--num-samples", "4", "--max-length", "16")
    assert res.exit_code == 0 and "linear repair was fitted on" not in res.stderr, res.stderr


def test_the_same_maps_give_the_same_file():
    from repskip.repair import store

    maps = {3: np.random.default_rng(0).normal(size=(8, 8)), 7: np.eye(8)}
    digests = {store.serialize(dict(maps))[1] for _ in range(20)}
    assert len(digests) == 1  # byte for byte, whatever order the metadata would come in


def test_a_map_that_raises_the_loss_is_not_kept(tiny, tmp_path, monkeypatch):
    from repskip.repair.linear import LeastSquares

    good = run("analyze", tiny["llama"], "-o", tmp_path / "good", "--strategy", "block-influence", "-k", "2",
               "--repair", "linear", "--num-samples", "4", "--max-length", "16")
    assert good.exit_code == 0 and (tmp_path / "good" / "repair.safetensors").exists()
    # a "fit" that blows the state up, whatever the ridge: every trial raises the loss
    monkeypatch.setattr(LeastSquares, "solve", lambda self, ridge: 50.0 * np.eye(self.mtm.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        res = run("analyze", tiny["llama"], "-o", tmp_path / "bad", "--strategy", "block-influence", "-k", "2",
                  "--repair", "linear", "--num-samples", "4", "--max-length", "16")
    assert res.exit_code == 0, res.output
    assert "brought the predictions closer" in res.stderr and "left unrepaired" in res.stderr
    assert not (tmp_path / "bad" / "repair.safetensors").exists()
    recipe = load_recipe(tmp_path / "bad" / "recipe.yaml")
    assert recipe.resolved.repair is None and recipe.resolved.remove == load_recipe(
        tmp_path / "good" / "recipe.yaml").resolved.remove
