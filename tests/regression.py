"""What the pre-layout code wrote for the tiny Llama / Qwen2 / Qwen3 / Mistral checkpoints (and
SmolLM2, in a slow test), so that the generic HF family can be held to the same results.

``python tests/regression.py tiny|smollm2`` records the fixture; tests/test_regression.py
compares against it. What takes no arithmetic (the layers chosen, configs, the plain
removal's shards) is compared byte for byte. What does (the statistics, the tensors the
repair folds into) moves in the last bits from one CPU to another, so each output tensor is
kept as its digest and a sketch: its sum, its norm and three fixed random projections, in
float64. A tensor whose digest differs must match the sketch to 1e-4 of its norm. The
fixtures were first recorded with the hand-written families the generic one replaced, and
re-recorded in this form (on an AMD EPYC) from a run that matched them bit for bit in
everything but the folded tensors and the statistics.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from click.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"
TINY_FAMILIES = ("qwen2", "llama", "qwen3", "mistral")
# what analysis.json holds that depends on the model and the code, not on the day it ran
STATISTICS = ("model", "calibration", "groups", "token_distance_profile", "settings")


def _run(*args) -> None:
    from repskip.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"repskip {' '.join(map(str, args))} failed: {result.output}")


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_digest(folder: Path) -> dict[str, str]:
    """The input's weights and config, by file: a fixture is about these inputs only."""
    return {p.name: _digest(p) for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name.startswith(("model", "config"))}


def tensors(folder: Path) -> dict[str, dict]:
    """Every tensor in ``folder``'s shards: its digest and sketch (see the module's docstring)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in sorted(load_file(shard).items()):
            flat = tensor.detach().to(torch.float64).flatten()
            gen = torch.Generator().manual_seed(0)
            projections = torch.randn(3, flat.numel(), generator=gen, dtype=torch.float64) @ flat
            out[name] = {"sha256": hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest(),
                         "sketch": [flat.sum().item(), flat.norm().item(), *projections.tolist()]}
    return out


def outputs(model: Path, work: Path, *analyze_args: str) -> dict:
    """Analyse ``model`` (with the repair) and compress it by the resolved recipe: the
    statistics, the recipe's layers, each output shard's digest and the rewritten config."""
    runs, out = work / "runs", work / "out"
    _run("analyze", model, "-o", runs, *analyze_args)
    analysis = json.loads((runs / "analysis.json").read_text())
    analysis["settings"].pop("device", None)
    analysis["model"].pop("path", None)  # where the test put it
    import yaml

    recipe = yaml.safe_load((runs / "recipe.yaml").read_text())
    _run("compress", model, "--recipe", runs / "recipe.yaml", "-o", out)
    config = json.loads((out / "config.json").read_text())
    # a second removal, chosen apart (two runs to renumber around), without the repair
    _run("select", runs / "analysis.json", "-o", work / "paper.yaml", "--strategy", "paper", "-k", "2",
         "--threshold", "-1")
    _run("compress", model, "--recipe", work / "paper.yaml", "-o", work / "out-paper")
    paper = yaml.safe_load((work / "paper.yaml").read_text())
    return {
        "analysis": {key: analysis[key] for key in STATISTICS},
        "removed": recipe["resolved"]["remove"],
        "repair_maps": [m["layer"] for m in (recipe["resolved"].get("repair") or {}).get("maps", [])],
        "shard_files": sorted(p.name for p in out.glob("*.safetensors")),
        "tensors": tensors(out),
        "config": config,
        "paper_removed": paper["resolved"]["remove"],
        "paper_shards": {p.name: _digest(p) for p in sorted((work / "out-paper").glob("*.safetensors"))},
        "paper_config": json.loads((work / "out-paper" / "config.json").read_text()),
    }


TINY_ARGS = ("-k", "2", "--strategy", "block-influence", "--repair", "linear", "--num-samples", "24",
             "--max-length", "48", "--ridge", "1e-3")
SMOL_ARGS = ("-k", "4", "--strategy", "block-influence", "--repair", "linear")


def record_tiny(root: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_checkpoint

    data = {}
    for i, fam in enumerate(TINY_FAMILIES):
        model = make_checkpoint(root / fam, fam, seed=i)
        data[fam] = {"input": checkpoint_digest(model), **outputs(model, root / f"{fam}-work", *TINY_ARGS)}
    return data


def record_smollm2(root: Path) -> dict:
    from repskip.default_model import ensure_default_model

    model = ensure_default_model()
    return {"input": checkpoint_digest(model), **outputs(model, root / "smol-work", *SMOL_ARGS)}


if __name__ == "__main__":
    import tempfile

    which = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        data = record_tiny(Path(tmp)) if which == "tiny" else record_smollm2(Path(tmp))
    FIXTURES.mkdir(exist_ok=True)
    (FIXTURES / f"regression_{which}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
