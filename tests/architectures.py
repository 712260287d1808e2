"""Tiny random checkpoints of the causal decoders transformers ships, for the layout tests.

Each model type starts from its config class's defaults (the real model's shape) and is
shrunk: the keys below are set where the default config has them, and a few types get the
extra keys their config validation needs. Weights are drawn larger than transformers' init,
so that every layer changes the hidden state and a layer run in the wrong mode shows.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

LAYERS = 6
VOCAB = 320

# shape keys, set wherever the default config has them (under the name it uses)
SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64,
    "intermediate_size": 96, "ffn_hidden_size": 96, "n_inner": 96, "dense_intermediate_size": 96,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "sliding_window": 8, "window_size": 8, "attention_window_size": 8, "sliding_window_size": 8,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 48,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    # multi-head latent attention
    "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16,
    # state-space / linear-attention mixers
    "state_size": 8, "mamba_d_state": 8, "ssm_state_size": 8, "d_state": 8,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_headdim": 16, "mamba_n_groups": 1, "n_groups": 1,
    "mamba_d_conv": 4, "conv_kernel": 4, "mamba_expand": 2, "expand": 2, "time_step_rank": 8,
    "mamba_chunk_size": 16, "chunk_size": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}

# what some types need beyond the generic shrink (their config validation, or a feature
# worth testing that their defaults leave off)
EXTRA: dict[str, dict] = {
    "qwen2_moe": {"mlp_only_layers": [1], "decoder_sparse_step": 2},
    # multi-head latent attention: the rotary part of a head is its head_dim, and every head has
    # its own keys and values
    "deepseek_v3": {"first_k_dense_replace": 1, "head_dim": 8, "num_key_value_heads": 4},
    "deepseek_v2": {"first_k_dense_replace": 1, "head_dim": 8, "num_experts_per_tok": 2, "num_key_value_heads": 4},
    "deepseek_v32": {"head_dim": 8, "num_key_value_heads": 4},
    "glm_moe_dsa": {"head_dim": 8, "num_key_value_heads": 4},
    "youtu": {"head_dim": 8, "num_key_value_heads": 4},
    "longcat_flash": {"head_dim": 8, "num_key_value_heads": 4},
    "glm4_moe_lite": {"num_key_value_heads": 4},
    "codegen": {"rotary_dim": 8},
    "gptj": {"rotary_dim": 8},
    "mamba2": {"num_heads": 8},
    # hybrids: attention among the state-space layers of a 6-layer stack
    "bamba": {"attn_layer_indices": [1, 4]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                                         "full_attention", "linear_attention"], "shared_intermediate_size": 48},
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "linear_attention",
                                         "full_attention"], "mamba_num_heads": 8, "mamba_head_dim": 16,
                   "moe_shared_expert_intermediate_size": 48},
    "falcon_h1": {"mamba_d_ssm": 128},
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]]},
    "gemma3_text": {"sliding_window_pattern": 3},
}


def tiny_config(model_type: str) -> dict:
    """A config.json dict of ``model_type`` at test size, as transformers would save it."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type).to_dict()
    overrides = {k: v for k, v in SHRINK.items() if k in default and default[k] is not None}
    overrides.update({k: LAYERS for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers") if k in default})
    for per_layer in ("layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers", "attention_layers"):
        if isinstance(default.get(per_layer), list):
            overrides[per_layer] = _periodic(default[per_layer], LAYERS)
    overrides.update(EXTRA.get(model_type, {}))
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(default.get(token), int) and default[token] >= VOCAB:
            overrides[token] = VOCAB - 1 - ("bos_token_id", "eos_token_id", "pad_token_id").index(token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type, **overrides)
    return json.loads(config.to_json_string(use_diff=False))


def _periodic(values: list, n: int) -> list:
    """The first ``n`` entries of a per-layer list, keeping every kind it holds: a kind that
    first appears past ``n`` takes the last place."""
    head = list(values[:n])
    missing = [v for v in dict.fromkeys(values) if v not in head]
    for i, v in enumerate(missing[: max(0, n - 1)]):
        head[n - 1 - i] = v
    return head


def build(model_type: str, seed: int = 0, config: dict | None = None):
    """A random model of ``model_type`` (fp32, eval), drawn so that every layer matters."""
    from transformers import AutoModelForCausalLM
    from repskip_hf.layout import build_config

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(build_config(config or tiny_config(model_type)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2 and "embed" not in name and "wte" not in name:
                p.normal_(0.0, 0.08)
            elif "norm" in name or "ln" in name.split(".")[-2:][0]:
                if leaf == "weight":
                    p.uniform_(0.5, 1.5)
    return model.float().eval()


def save(model, path: Path) -> Path:
    from helpers import make_tokenizer

    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return Path(path)


# --- the checks each model type is held to -------------------------------------------------------
# layers removed by hand: 0 moves every kept layer (prefix counts such as first_k_dense_replace
# change), 2 breaks every period of 2 or 3 (alternating sliding / global attention, 1-in-3)
REMOVE = [0, 2]
REMOVE_FOR = {
    "jamba": [2, 3],  # its experts every 2nd layer: 0, 2 leaves no period that selects them
    # the first layer differs from the others (no norm before attention; a norm of the embeddings)
    "modernbert-decoder": [1, 3], "rwkv": [1, 3],
}
# the hybrids' attention layers are protected from the analysis's choice: a model left without
# one is refused (tested on its own)
ANALYZE_ARGS = {"bamba": ["--protect", "1,4"], "granitemoehybrid": ["--protect", "1,4"],
                "nemotron_h": ["--protect", "2,5"], "jamba": ["--protect", "4"],
                # linear attention in three layers of four, full attention in the fourth
                "qwen3_next": ["--protect", "3"], "qwen3_5_text": ["--protect", "3"],
                "qwen3_5_moe_text": ["--protect", "3"]}
TOLERANCE = 1e-5


def cli(*args):
    from click.testing import CliRunner

    from repskip.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result) -> str:
    """The output of a CLI run that must succeed; else its error line (or exception) as the failure."""
    if result.exit_code != 0:
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        raise AssertionError(errors[-1] if errors else f"{type(result.exception).__name__}: {result.exception}")
    return result.output


def make(model_type: str, root: Path, seed: int = 0) -> Path:
    return save(build(model_type, seed), Path(root) / model_type)


def ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_clean(path: Path):
    """The model at ``path``, refusing a load that leaves a key missing, unexpected or resized."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    return model.float().eval()


@torch.no_grad()
def bypassed_logits(model, family, removed, maps=None) -> torch.Tensor:
    """``model`` run in memory with ``removed`` layers passing their input through (and the
    repair maps applied to the MLP outputs they name)."""
    from repskip.analyze.surgery import Surgery
    from repskip.repair.fit import torch_maps

    x = ids()
    with Surgery(model, family) as s:
        s.set(skip=removed, maps=torch_maps(maps or {}, next(model.parameters())))
        return s.run(lambda: model(input_ids=x).logits)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=ids()).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def cached_equals_uncached(model, new_tokens: int = 6) -> bool:
    prompt = ids(1, 8, seed=2)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = model.generate(prompt, use_cache=True, **kw)
        b = model.generate(prompt, use_cache=False, **kw)
    return a.shape == b.shape and bool((a == b).all())


def attention_kinds(model, family) -> list[tuple]:
    """Each layer's attention kind as its modules say (attention type, window, sliding flag)."""
    out = []
    for layer in family.decoder_layers(model):
        kind = []
        for name, module in layer.named_modules():
            for attr in ("attention_type", "layer_type", "sliding_window", "is_sliding", "use_sliding_window"):
                if attr in vars(module):
                    kind.append((name, attr, vars(module)[attr]))
        out.append(tuple(kind))
    return out


def removal(model_type: str) -> list[int]:
    return REMOVE_FOR.get(model_type, REMOVE)


def family_of(path: Path):
    from repskip.family import find_family

    return find_family(json.loads((Path(path) / "config.json").read_text()))[1]


def check_compress(model_type: str, base: Path, work: Path, original=None) -> Path:
    """Remove layers by hand: the output reloads cleanly, computes the original model with
    those layers bypassed, generates the same with and without its KV cache, and every kept
    layer keeps its attention kind. Returns the output folder."""
    import yaml

    removed = removal(model_type)
    recipe = work / "remove.yaml"
    recipe.write_text(yaml.safe_dump({"schema_version": 1, "resolved": {"remove": removed}}))
    out = work / "compressed"
    ok(cli("compress", base, "--recipe", recipe, "-o", out))
    family = family_of(base)
    original = original or load_clean(base)
    pruned = load_clean(out)
    diff = max_diff(bypassed_logits(original, family, removed), logits(pruned))
    assert diff <= TOLERANCE, f"logits differ by {diff:.3g} from the original model with the layers bypassed"
    assert cached_equals_uncached(pruned), "generation with the KV cache differs from generation without it"
    in_memory = load_clean(base)  # what verify and the ONNX export do: remove the layers of a loaded model
    family.remove_layers(in_memory, [i for i in range(len(family.decoder_layers(in_memory))) if i not in removed])
    diff = max_diff(logits(in_memory), logits(pruned))
    assert diff <= TOLERANCE, f"removing the layers in memory gives logits {diff:.3g} away from the written model's"
    assert cached_equals_uncached(in_memory), "in memory, generation with the KV cache differs from without it"
    before = attention_kinds(original, family)
    kept = [i for i in range(len(before)) if i not in removed]
    assert [before[i] for i in kept] == attention_kinds(pruned, family), "a kept layer changed its attention kind"
    return out


def check_repair(model_type: str, base: Path, work: Path, original=None) -> str:
    """analyze with the repair, compress: the output computes the in-memory repaired model.
    Returns "ok", or the one-line refusal where no map folds exactly into this model."""
    from repskip.recipe import load as load_recipe

    runs = work / "runs"
    result = cli("analyze", base, "-o", runs, "-k", "2", "--repair", "linear", "--num-samples", "16",
                 "--max-length", "32", "--no-reuse", *ANALYZE_ARGS.get(model_type, []))
    if result.exit_code != 0:
        line = [x for x in result.output.splitlines() if x.startswith("error: ")]
        assert result.exit_code == 1 and line and "linear map" in line[-1], ok(result)
        return "refused: " + line[-1].removeprefix("error: ")
    recipe = load_recipe(runs / "recipe.yaml")
    out = work / "repaired"
    ok(cli("compress", base, "--recipe", runs / "recipe.yaml", "-o", out))
    family = family_of(base)
    maps = recipe.repair_maps(family.hidden_size(json.loads((base / "config.json").read_text())))
    assert maps, "the fit kept no map"
    original = original or load_clean(base)
    expected = bypassed_logits(original, family, recipe.resolved.remove, maps)
    diff = max_diff(expected, logits(load_clean(out)))
    # folding a map into the weights rounds differently from applying it: float32 noise that
    # grows with the logits' size, so the bound is relative to them
    bound = TOLERANCE * max(1.0, float(expected.abs().max()))
    assert diff <= bound, f"logits differ by {diff:.3g} (bound {bound:.3g}) from the in-memory repaired model"
    return "ok"


def check_onnx(model_type: str, base: Path, work: Path) -> Path:
    """Export the hand removal to ONNX: the export's own parity check (ONNX Runtime against
    PyTorch at batch 1 and 3, padded, and on cached decode steps) must pass."""
    out = work / "onnx"
    ok(cli("compress", base, "--recipe", work / "remove.yaml", "--format", "onnx", "-o", out))
    return out


TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "A journey of a thousand miles begins with one step. ") * 40


def check_heal(model_type: str, compressed: Path, base: Path, work: Path) -> Path:
    """A few steps of LoRA distillation from the original model: the healed checkpoint reloads
    cleanly and computes finite logits that differ from the unhealed ones."""
    data = work / "heal.txt"
    data.write_text(TEXT)
    out = work / "healed"
    ok(cli("heal", compressed, "--teacher", base, "--data", data, "--steps", "3", "--seq-len", "32",
           "--batch-size", "2", "--eval-sequences", "2", "--eval-every", "3", "--save-every", "3", "--lr", "1e-2",
           "-o", out))
    before, after = logits(load_clean(compressed)), logits(load_clean(out))
    assert bool(torch.isfinite(after).all()), "the healed model computes non-finite logits"
    assert max_diff(before, after) > 0, "healing changed nothing"
    return out


CHECKS = ("analyze", "compress", "repair", "onnx", "heal")


def measure(model_type: str, root: Path, checks: tuple[str, ...] = CHECKS) -> dict[str, str]:
    """The ``checks`` on ``model_type``: check -> "ok", or why it failed (for the support table)."""
    import traceback

    results: dict[str, str] = {}
    root.mkdir(parents=True, exist_ok=True)

    def attempt(name: str, fn) -> bool:
        try:
            outcome = fn()
        except Exception as exc:  # the table records what failed, in one line
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            results[name] = f"fails: {line[:200]}"
            if not isinstance(exc, AssertionError):
                results[name] += f" ({type(exc).__name__}: {traceback.extract_tb(exc.__traceback__)[-1].name})"
            return False
        results[name] = outcome if isinstance(outcome, str) and outcome else "ok"
        return True

    try:
        base = make(model_type, root)
    except Exception as exc:
        return {"build": f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    if "analyze" in checks:
        attempt("analyze", lambda: ok(cli("analyze", base, "-o", root / "plain", "-k", "2", "--repair", "none",
                                          "--num-samples", "8", "--max-length", "32",
                                          *ANALYZE_ARGS.get(model_type, []))) and "ok")
    compressed = root / "compressed"
    attempt("compress", lambda: check_compress(model_type, base, root) and "ok")
    if "repair" in checks:
        attempt("repair", lambda: check_repair(model_type, base, root))
    if results.get("compress") == "ok":
        if "onnx" in checks:
            attempt("onnx", lambda: check_onnx(model_type, base, root) and "ok")
        if "heal" in checks:
            attempt("heal", lambda: check_heal(model_type, compressed, base, root) and "ok")
    return results


# --- the support table: measured here, written into the plugin and the docs ------------------------
SUPPORT = Path(__file__).resolve().parents[1] / "plugins" / "hf" / "repskip_hf" / "tested.json"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def candidates() -> list[str]:
    """Every decoder-only causal-LM model type of the installed transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from repskip_hf.layout import kind_problem

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.for_model(model_type).to_dict()
        except Exception:
            continue
        if kind_problem(config) is None:
            out.append(model_type)
    return out


def doc_table(data: dict) -> str:
    """docs/architectures.md's table of what works, from tested.json."""
    def cell(value: str | None) -> str:
        if value is None:
            return "not tried"
        if value == "ok":
            return "yes"
        return ("no: " + value.split(": ", 1)[-1]).replace("|", "/")[:160]

    rows = [f"Measured with transformers {data['transformers']} and torch {data['torch']} "
            f"({sum(1 for r in data['types'].values() if r.get('compress') == 'ok')} of {len(data['types'])} "
            "model types compress).", "",
            "| model_type | " + " | ".join(CHECKS) + " |", "| --- |" + " --- |" * len(CHECKS)]
    for model_type, result in sorted(data["types"].items()):
        if "build" in result:
            rows.append(f"| `{model_type}` | " + " | ".join(["(no test model)"] + [""] * (len(CHECKS) - 1)) + " |")
            continue
        rows.append(f"| `{model_type}` | " + " | ".join(cell(result.get(c)) for c in CHECKS) + " |")
    return "\n".join(rows)


def write_doc(data: dict) -> None:
    text = DOC.read_text()
    begin, end = "<!-- table: generated by tests/architectures.py -->", "<!-- end of table -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{begin}\n{doc_table(data)}\n{end}{tail}")


def record(model_type: str, result: dict[str, str]) -> None:
    """Put one model type's results into tested.json and the docs table. Several measuring
    processes (each given its own model types) may share the files: each update happens under
    a lock, on what the file holds then, and lands by a rename."""
    import fcntl
    import tempfile

    import transformers

    with open(Path(tempfile.gettempdir()) / "repskip-tested.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(SUPPORT.read_text()) if SUPPORT.is_file() else {"types": {}}
        data.update(transformers=transformers.__version__, torch=torch.__version__)
        data["types"][model_type] = result
        partial = SUPPORT.with_name(SUPPORT.name + ".partial")
        partial.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        partial.replace(SUPPORT)
        write_doc(data)


def main(argv: list[str]) -> None:
    """python tests/architectures.py [--part K/N] [MODEL_TYPE ...]: measure every check on the
    given model types (all decoder-only ones by default; with --part, the K-th of N slices of
    them, so that N processes can share the machine), update tested.json and the docs table."""
    import sys
    import tempfile
    import time

    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    transformers.logging.set_verbosity_error()
    part = (1, 1)
    if argv[:1] == ["--part"]:
        part = tuple(int(x) for x in argv[1].split("/"))
        argv = argv[2:]
    model_types = (argv or candidates())[part[0] - 1::part[1]]
    for model_type in model_types:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = measure(model_type, Path(tmp))
        record(model_type, result)
        print(f"{model_type}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])


def family_of_config(config: dict):
    from repskip.family import find_family

    return find_family(config)[1]
