"""A checkpoint bigger than the machine's memory, analysed, repaired and compressed.

The bench writes a random-weight checkpoint of a real large architecture's shapes (by default
Llama-3-8B's, in float32: 32 GB, more than this 24 GiB machine's memory), shard by shard with
a fixed seed, so that no more than one shard is ever in memory. Then, each in its own process
with its peak RSS read from the kernel (getrusage of the child):

  refuse    `repskip analyze --offload none`: must stop before loading, in one line, since the
            estimated need exceeds the available memory
  analyze   `repskip analyze -k K --repair linear` (offload auto: one layer at a time from disk)
            on a small calibration set
  compress  `repskip compress --recipe` of the analysis's recipe (the repair folded in)

and finally the output is opened lazily and checked tensor by tensor against the input: every
kept layer's tensors equal the input's under their new index, except the MLP output
projections the repair folded into (same shape, changed), and nothing else is missing or
extra. Free disk is checked first (input plus output); everything the bench wrote is removed at
the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common

NAME = "big_model"
SHAPES = {
    "llama-3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2),
    # a quick run of the bench's own steps (fits in memory: analyze runs it whole)
    "smoke": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
                  num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                  max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def write_checkpoint(folder: Path, config: dict, dtype: str, seed: int) -> int:
    """Each layer (and the embeddings, the head) in its own shard, generated and written one at
    a time; returns the bytes of weights written."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from repskip_hf.layout import layout

    folder.mkdir(parents=True)
    cfg = AutoConfig.for_model(**config)
    cfg.torch_dtype = dtype
    full = cfg.to_dict()
    (folder / "config.json").write_text(json.dumps(full, indent=2))
    shapes = layout(full).saved
    prefix = "model.layers."
    groups: dict[str, list[str]] = {}
    for name in sorted(shapes):
        key = name.split(".")[2] if name.startswith(prefix) else name
        groups.setdefault(key, []).append(name)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    order = sorted(groups, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    for n, key in enumerate(order):
        tensors = {}
        for name in groups[key]:
            shape = shapes[name]
            if len(shape) == 1:  # norms
                tensors[name] = torch.ones(shape, dtype=torch_dtype)
            else:
                t = torch.empty(shape, dtype=torch.float32)
                t.normal_(0.0, 0.02, generator=generator)
                tensors[name] = t.to(torch_dtype)
        file = f"model-{n + 1:05d}-of-{len(order):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        print(f"  wrote {file} ({key})", file=sys.stderr)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def copy_tokenizer(folder: Path) -> None:
    source = _common.default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder)


_CHILD = ("import sys\nfrom repskip.cli import main\n"
          "try:\n    main(sys.argv[1:])\n"
          "finally:\n    print('PEAK_RSS_KB', next(l.split()[1] for l in open('/proc/self/status')"
          " if l.startswith('VmHWM:')), file=sys.stderr)\n")


def timed(args: list[str]) -> dict:
    """Run a repskip command in a child process: exit code, seconds, its own peak RSS (the
    kernel's high-water mark, read as it exits), its last lines."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = (done.stdout + done.stderr).strip().splitlines()
    peak = [int(line.split()[1]) for line in lines if line.startswith("PEAK_RSS_KB")]
    lines = [line for line in lines if not line.startswith("PEAK_RSS_KB")]
    return {"command": "repskip " + " ".join(args), "exit_code": done.returncode, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak[-1] / 1024, 1) if peak else None, "tail": lines[-8:],
            "errors": [line for line in lines if line.startswith("error:")]}


def check_output(source: Path, output: Path, removed: list[int], anchors: list[int], num_layers: int) -> dict:
    """Every tensor of ``output`` against ``source``, opened lazily one tensor at a time."""
    from safetensors import safe_open

    from repskip.checkpoint import open_checkpoint

    src, out = open_checkpoint(source), open_checkpoint(output)
    kept = [i for i in range(num_layers) if i not in removed]
    expected = {}
    for name in src.tensors:
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index in removed:
                continue
            expected[name.replace(f"model.layers.{index}.", f"model.layers.{kept.index(index)}.", 1)] = name
        else:
            expected[name] = name
    assert set(expected) == set(out.tensors), "the output's tensor names are not the kept layers' renumbered"
    folded = {f"model.layers.{kept.index(a)}.mlp.down_proj.weight" for a in anchors}
    equal = changed = 0
    for new, old in expected.items():
        with safe_open(str(out.tensors[new].file), "pt") as f, safe_open(str(src.tensors[old].file), "pt") as g:
            a, b = f.get_tensor(new), g.get_tensor(old)
        assert a.shape == b.shape and a.dtype == b.dtype, new
        same = bool((a == b).all())
        if new in folded:
            assert not same, f"{new} should carry the repair"
            changed += 1
        else:
            assert same, f"{new} differs from {old}"
            equal += 1
        del a, b
    return {"tensors": len(expected), "equal": equal, "folded": changed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--folder", default="/tmp/repskip-big-model", help="where the bench writes (removed at the end)")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep what the bench wrote")
    ap.add_argument("--json", default=_common.default_json(NAME))
    args = ap.parse_args()

    from repskip.engine.offload import available

    root = Path(args.folder)
    if root.exists():
        raise SystemExit(f"{root} exists; remove it or choose --folder")
    config = SHAPES[args.shapes]
    h, inter, n, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    params = n * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + 2 * vocab * h + h
    size = params * (4 if args.dtype == "float32" else 2)
    root.mkdir(parents=True)
    free_disk = shutil.disk_usage(root).free
    memory = available("cpu")
    results: dict = {"shapes": args.shapes, "dtype": args.dtype, "weights_gb": round(size / 1e9, 2),
                     "available_memory_gb": round(memory / 1e9, 2), "free_disk_gb": round(free_disk / 1e9, 1)}
    try:
        if free_disk < 2.1 * size:
            raise SystemExit(f"needs about {2.1 * size / 1e9:.0f} GB of free disk under {root}, "
                             f"{free_disk / 1e9:.0f} GB free")
        print(f"{args.shapes} in {args.dtype}: {size / 1e9:.1f} GB of weights, {memory / 1e9:.1f} GB of memory "
              "available", file=sys.stderr)
        source = root / "input"
        start = time.perf_counter()
        written = write_checkpoint(source, config, args.dtype, args.seed)
        copy_tokenizer(source)
        results["write_seconds"] = round(time.perf_counter() - start, 1)
        results["written_gb"] = round(written / 1e9, 2)
        calib = ["--num-samples", str(args.num_samples), "--max-length", str(args.max_length),
                 "--batch-size", str(args.batch_size)]
        results["refuse"] = timed(["analyze", str(source), "-o", str(root / "refused"), "--offload", "none", *calib])
        print(f"refuse: {results['refuse']['errors']}", file=sys.stderr)
        results["analyze"] = timed(["analyze", str(source), "-o", str(root / "analysis"), "-k", str(args.k), *calib])
        print("\n".join(results["analyze"]["tail"]), file=sys.stderr)
        if results["analyze"]["exit_code"] != 0:
            raise SystemExit("analyze failed")
        recipe = root / "analysis" / "recipe.yaml"
        results["compress"] = timed(["compress", str(source), "--recipe", str(recipe), "-o", str(root / "output")])
        if results["compress"]["exit_code"] != 0:
            raise SystemExit("compress failed:\n" + "\n".join(results["compress"]["tail"]))
        import yaml

        resolved = yaml.safe_load(recipe.read_text())["resolved"]
        anchors = [int(m["layer"]) for m in (resolved.get("repair") or {}).get("maps", [])]
        results["removed"] = resolved["remove"]
        results["check"] = check_output(source, root / "output", resolved["remove"], anchors, n)
        results["seconds_per_layer"] = {
            "analyze": round(results["analyze"]["seconds"] / n, 1),
            "compress": round(results["compress"]["seconds"] / n, 1)}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = [[step, results[step]["exit_code"], results[step]["seconds"], results[step]["peak_rss_mb"]]
            for step in ("refuse", "analyze", "compress")]
    print(_common.table(["step", "exit", "seconds", "peak RSS MB"], rows))
    print(f"refusal: {results['refuse']['errors']}")
    print(f"check: {results['check']}")
    path = _common.write_json(args.json, _common.report(NAME, vars(args), results))
    print(f"results written to {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
