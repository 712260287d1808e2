"""LLaDA sampler throughput: repskip's sampler against a plain loop of the authors' algorithm.

Model: SmolLM2-135M-Instruct's weights in LLaDA's on-disk layout (30 layers; the speed of a
diffusion sampler depends on the model's size and the settings, not on what it learnt).
Both run the same model object with the same settings (steps, gen_length, block_length,
low-confidence remasking, temperature 0); the reference is the authors' generate() written
out straightforwardly here: logits and a full-vocabulary softmax for every position, a
Python loop over rows for the top-k. repskip computes the LM head and the softmax for the
current block only (the only positions a step can reveal), with identical tokens. Reported: generated tokens per second,
forward passes, and the ratio repskip / reference at each batch size (target >= 1.0 at
batch 1, higher with batching). Each timing is the minimum over --repeats runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common  # noqa: E402
from helpers import llada_from_llama  # noqa: E402  (the layout conversion the tests use)


def reference_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """The authors' low-confidence remasking loop, temperature 0, no CFG, written plainly."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start : start + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            num_transfer_tokens[i, : remainder[i]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, start + block_length :] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=_common.default_json("diffusion_sampler"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from repskip.pipeline import open_model
    from repskip_diffusion.samplers import llada_generate

    work = Path(tempfile.mkdtemp(prefix="bench-llada-"))
    path = llada_from_llama(_common.default_model(), work / "smol-llada")
    handle = open_model(path)
    model = handle.family.load(path)
    mask_id = handle.family.mask_token_id(handle.ckpt.config)
    settings = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
    rows, results = [], {}
    with torch.inference_mode():
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompt = torch.randint(0, 40000, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
            ones = torch.ones_like(prompt)
            timings = {"reference": [], "repskip": []}
            outputs = {}
            for _ in range(args.repeats):
                t = time.perf_counter()
                outputs["reference"] = reference_generate(model, prompt, mask_id=mask_id, **settings)
                timings["reference"].append(time.perf_counter() - t)
                t = time.perf_counter()
                denoise = lambda x, m, w: handle.family.token_logits(model, x, m, w)  # noqa: E731
                outputs["repskip"] = llada_generate(denoise, prompt, ones, mask_id=mask_id, **settings)
                timings["repskip"].append(time.perf_counter() - t)
            same = torch.equal(outputs["reference"], outputs["repskip"])
            tok = batch * args.gen_length
            ref_s, ours_s = min(timings["reference"]), min(timings["repskip"])
            results[f"batch{batch}"] = {
                "reference_s": round(ref_s, 3), "repskip_s": round(ours_s, 3),
                "reference_tok_s": round(tok / ref_s, 2), "repskip_tok_s": round(tok / ours_s, 2),
                "ratio": round(ref_s / ours_s, 3), "forward_passes": args.steps, "identical_tokens": same,
            }
            rows.append([batch, f"{tok / ref_s:.1f}", f"{tok / ours_s:.1f}", f"{ref_s / ours_s:.2f}x", args.steps, same])
    print(_common.table(["batch", "reference tok/s", "repskip tok/s", "repskip / reference", "forwards", "same tokens"], rows))
    data = _common.report("diffusion_sampler", {**settings, "prompt_len": args.prompt_len, "repeats": args.repeats,
                                                "model": "SmolLM2-135M-Instruct in LLaDA layout", "threads": args.threads}, results)
    print(f"wrote {_common.write_json(args.json, data)}")


if __name__ == "__main__":
    main()
