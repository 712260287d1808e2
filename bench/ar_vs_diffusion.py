"""Does a masked-diffusion LM carry more layer redundancy than an autoregressive one when the
two differ in the objective alone? Trains both here and measures it.

Two models of one architecture (Llama blocks: RMSNorm, SwiGLU, rotary attention), one
tokenizer (byte-level BPE trained on the data by ``tokenizers``), the same data, token
budget, seed and even the same initial weights, differing only in the objective:

- ``ar``: next-token prediction, causal attention, saved in the Llama layout;
- ``diffusion``: LLaDA's masked diffusion, bidirectional attention, saved in LLaDA's layout.

Both train with ``repskip heal --method full --layers all --train-embeddings --loss lm``
(the family picks its objective). Then, through repskip's own commands:

1. ``repskip analyze`` each (the diffusion model under the mask-ratio sweep, and again along
   its sampler's denoising trajectories), with a greedy-loss search recorded;
2. ``repskip select`` k = 1..--max-k layers by each strategy; ``repskip verify --recipe`` each
   on held-out text: retention = base perplexity / perplexity after removal (AR:
   next-token; diffusion: the masked-diffusion bound, the same estimate LLaDA reports);
3. for the diffusion model, sample quality of its own sampler after each removal: the
   generated continuations of held-out prompts scored by the trained AR model (generative
   perplexity), their token agreement with the full model's, and distinct bigrams;
4. ``repskip compare`` overlays the two: figures and a table.

Every stage's output lives under --work and is reused when present, so a killed run picks up
where it stopped (a stage is redone by deleting its folder). Results: --work/study.json and
bench/results/ar_vs_diffusion.json with --record. docs/study.md has the numbers.

    python bench/ar_vs_diffusion.py --work ~/.cache/repskip/study --record

Size flags (--layers, --width, --heads, --ffn, --vocab, --steps, --batch-size, --seq-len)
scale it; the defaults train each model in about 30 minutes on 2 CPU cores, one thread each
in parallel (--sequential for one after the other).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA = _common.REPO.parent / "shared" / "data"
KINDS = ("ar", "diffusion")
TITLES = {"ar": "AR (causal, next-token)", "diffusion": "diffusion (bidirectional, masked)"}
STRATEGIES = ("paper", "block-influence", "angular-block", "greedy-loss")
SPECIALS = ["<|endoftext|>", "<|mask|>"]
BLOCK_CHARS = 1800  # held-out and calibration text is cut into blocks of about this many characters


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def repskip(args: list[str], commands: list[str], run: bool = True) -> subprocess.CompletedProcess | None:
    """Run a repskip command as a user would (same interpreter), recording it; with ``run``
    false, only record it (its output is there from an earlier run)."""
    cmd = [sys.executable, "-m", "repskip", *map(str, args)]
    commands.append(shlex.join(["repskip", *map(str, args)]))
    if not run:
        return None
    log(commands[-1])
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        log("  failed: " + (done.stdout.strip().splitlines() or ["(no output)"])[-1])
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout)
    return done


STUDY_MARKER = ".repskip-study-tmp"


def fresh_tmp(path: Path) -> Path:
    """An empty folder at ``path`` for a stage to build in before it is renamed into place. A
    folder left there by a killed run (it holds the study's marker) is removed first; anything
    else at that path is the user's and is refused, untouched."""
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not (path / STUDY_MARKER).is_file():
            raise SystemExit(f"{path} exists and was not made by this study; move it away or choose another --work")
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / STUDY_MARKER).write_text("a stage of bench/ar_vs_diffusion.py builds here\n")
    return path


# --- data ------------------------------------------------------------------------------------------
def _blocks(text: str, size: int = BLOCK_CHARS) -> list[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters."""
    out, cur = [], []
    for line in text.splitlines():
        cur.append(line)
        if sum(len(x) + 1 for x in cur) >= size:
            out.append("\n".join(cur).strip())
            cur = []
    if cur and "\n".join(cur).strip():
        out.append("\n".join(cur).strip())
    return [b for b in out if b]


def _gsm8k(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)


def _interleave(*sources: list[str], count: int) -> list[str]:
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        j = i // len(sources)
        if j < len(src):
            out.append(src[j])
    return out


def build_data(work: Path) -> dict:
    """train/ (three files: WikiText-2 validation, GSM8K train, Tiny Shakespeare but its last
    tenth), calib.txt (blocks of the training text) and heldout.txt (WikiText-2 test, GSM8K
    test, the last tenth of Tiny Shakespeare, interleaved block by block: never trained on)."""
    folder = work / "data"
    if (folder / "heldout.txt").is_file():
        return json.loads((folder / "data.json").read_text())
    tmp = fresh_tmp(work / ".data.tmp")
    (tmp / "train").mkdir()
    shakespeare = (DATA / "shakespeare" / "input.txt").read_text("utf-8")
    cut = shakespeare.rfind("\n\n", 0, int(len(shakespeare) * 0.9))
    wiki = (DATA / "wikitext2" / "valid.txt").read_text("utf-8")
    gsm = _gsm8k(DATA / "gsm8k" / "train.jsonl")
    train = {"wikitext2-valid.txt": wiki, "gsm8k-train.txt": gsm, "shakespeare-train.txt": shakespeare[:cut]}
    for name, text in train.items():
        (tmp / "train" / name).write_text(text, "utf-8")
    calib = _interleave(*(_blocks(t) for t in train.values()), count=96)
    (tmp / "calib.txt").write_text("\n\n".join(calib) + "\n", "utf-8")
    held = _interleave(_blocks((DATA / "wikitext2" / "test.txt").read_text("utf-8")),
                       _blocks(_gsm8k(DATA / "gsm8k" / "test.jsonl")), _blocks(shakespeare[cut:]), count=96)
    (tmp / "heldout.txt").write_text("\n\n".join(held) + "\n", "utf-8")
    info = {"train_chars": {k: len(v) for k, v in train.items()}, "calib_blocks": len(calib),
            "heldout_blocks": len(held)}
    (tmp / "data.json").write_text(json.dumps(info, indent=1))
    (tmp / STUDY_MARKER).unlink()
    tmp.rename(folder)
    return info


def train_tokenizer(work: Path, vocab: int) -> Path:
    folder = work / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(sorted(str(p) for p in (work / "data" / "train").iterdir()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   mask_token=SPECIALS[1])
    tmp = fresh_tmp(work / ".tokenizer.tmp")
    fast.save_pretrained(tmp)
    (tmp / STUDY_MARKER).unlink()
    tmp.rename(folder)
    return folder


def initial_models(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The same random weights in the Llama layout (ar) and LLaDA's (diffusion)."""
    folders = {k: work / "init" / k for k in KINDS}
    if all((f / "config.json").is_file() for f in folders.values()):
        return folders
    import torch
    from repskip_diffusion.convert import llada_from_llama
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    tmp = fresh_tmp(work / ".init.tmp")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(1024, args.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp / "ar")
    tokenizer.save_pretrained(tmp / "ar")
    llada_from_llama(tmp / "ar", tmp / "diffusion", mask_token_id=tokenizer.mask_token_id)
    (tmp / STUDY_MARKER).unlink()
    tmp.rename(work / "init")
    return folders


# --- training --------------------------------------------------------------------------------------
def train(work: Path, args: argparse.Namespace, commands: list[str]) -> dict[str, dict]:
    out = {k: work / "models" / k for k in KINDS}
    todo = [k for k in args.kinds if not (out[k] / "heal.json").is_file()]
    threads = max(1, (os.cpu_count() or 2) // (1 if args.sequential else len(todo) or 1))
    procs = []
    for kind in todo:
        cmd = ["heal", work / "init" / kind, "--data", work / "data" / "train", "-o", out[kind],
               "--method", "full", "--layers", "all", "--train-embeddings", "--loss", "lm",
               "--steps", args.steps, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
               "--lr", args.lr, "--weight-decay", 0.1, "--warmup", 0.05, "--eval-sequences", 32,
               "--eval-every", max(args.steps // 10, 1), "--save-every", max(args.steps // 20, 1),
               "--seed", args.seed, "--threads", threads, "--device", args.device]
        commands.append(shlex.join(["repskip", *map(str, cmd)]))
        log(commands[-1])
        (work / f"train-{kind}.json").write_text(json.dumps({"command": commands[-1], "threads": threads}))
        with open(work / f"train-{kind}.log", "a") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "repskip", *map(str, cmd)], stdout=fh,
                                    stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if args.sequential:
            if proc.wait():
                raise SystemExit(f"training {kind} failed: see {work / f'train-{kind}.log'}")
        else:
            procs.append((kind, proc))
    for kind, proc in procs:
        if proc.wait():
            raise SystemExit(f"training {kind} failed: see {work / f'train-{kind}.log'}")
    records = {}
    for kind in args.kinds:
        rec = json.loads((out[kind] / "heal.json").read_text())
        ev = rec["history"]["eval"]
        launched = json.loads((work / f"train-{kind}.json").read_text()) if (work / f"train-{kind}.json").is_file() \
            else {}
        records[kind] = {**launched, "seconds": rec["seconds"], "steps": rec["settings"]["steps"],
                         "tokens": rec["data"]["seq_len"] * rec["settings"]["steps"] * rec["settings"]["batch_size"],
                         "parameters": rec["trainable_parameters"], "held_out_lm": [ev[0]["lm"], ev[-1]["lm"]]}
    return records


# --- analysis, removal, retention ------------------------------------------------------------------
def analyze(work: Path, args: argparse.Namespace, commands: list[str]) -> None:
    calib = work / "data" / "calib.txt"
    common = ["--calib", calib, "--num-samples", 64, "--max-length", 256, "--strategy", "greedy-loss",
              "-k", args.max_k, "--repair", "none", "--search-samples", 16, "--device", args.device]
    for kind in KINDS:
        repskip(["analyze", work / "models" / kind, "-o", work / "runs" / kind, *common], commands,
                run=not (work / "runs" / kind / "analysis.json").is_file())
    repskip(["analyze", work / "models" / "diffusion", "-o", work / "runs" / "diffusion-sampling",
                 "--mode", "sampling", "--device", args.device, "--calib", work / "data" / "heldout.txt",
                 "--num-samples", 16,
                 "--max-length", 64, "-k", args.max_k, "--repair", "none", "--no-chat",
                 *[x for setting in (f"gen_length={args.gen_length}", f"steps={args.gen_length}",
                                     f"block_length={args.gen_length}", f"temperature={args.temperature}")
                   for x in ("--sampler-setting", setting)]], commands,
            run=not (work / "runs" / "diffusion-sampling" / "analysis.json").is_file())


def removals(work: Path, args: argparse.Namespace, commands: list[str]) -> dict:
    """Recipes for each kind, strategy and k (None where the strategy cannot remove k)."""
    out: dict = {}
    for kind in KINDS:
        for strategy in STRATEGIES:
            for k in range(1, args.max_k + 1):
                path = work / "recipes" / f"{kind}-{strategy}-k{k}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    # paper: its ranking by cosine and its no-adjacent rule, without the 0.95 bar
                    # (no layer of a model this small reaches it)
                    bar = ["--threshold", -1] if strategy == "paper" else []
                    repskip(["select", work / "runs" / kind / "analysis.json", "-o", path, "--strategy",
                             strategy, "-k", k, *bar], commands, run=not path.is_file())
                except subprocess.CalledProcessError as e:
                    out[f"{kind}/{strategy}/{k}"] = {"error": e.stdout.strip().splitlines()[-1]}
                    continue
                from repskip.recipe import load as load_recipe

                out[f"{kind}/{strategy}/{k}"] = {"recipe": str(path),
                                                 "removed": list(load_recipe(path).resolved.remove)}
    return out


def verify(work: Path, args: argparse.Namespace, kind: str, recipe, folder: Path, commands: list[str]) -> None:
    """Held-out perplexity of ``kind``'s model with ``recipe`` applied, into ``folder`` (kept)."""
    repskip(["verify", work / "models" / kind, "--recipe", recipe, "--bench", "perplexity",
             "--data", f"perplexity={work / 'data' / 'heldout.txt'}", "--limit", args.items,
             "--speed-repeats", 1, "--max-length", args.seq_len, "--device", args.device, "-o", folder],
            commands, run=not (folder / "report.json").is_file())


def verify_all(work: Path, args: argparse.Namespace, rows: dict, commands: list[str]) -> None:
    measured: dict[tuple, Path] = {}  # (kind, removed layers) -> the report that measured them
    for key, row in rows.items():
        if "recipe" not in row:
            continue
        kind, strategy, k = key.split("/")
        folder = work / "verify" / f"{kind}-{strategy}-k{k}"
        same = measured.get((kind, tuple(row["removed"])))
        if same is not None and not (folder / "report.json").is_file():
            folder = same  # another strategy chose the same layers: the same measurement
        measured.setdefault((kind, tuple(row["removed"])), folder)
        if same is None or same != folder:
            verify(work, args, kind, row["recipe"], folder, commands)
        report = json.loads((folder / "report.json").read_text())
        bench = report["benchmarks"]["perplexity"]
        row.update(verify=str(folder), retention=bench["retention"], ci=bench["retention_ci95"],
                   base_ppl=bench["base"], ppl=bench["compressed"], items=bench["items"])


def repaired(work: Path, args: argparse.Namespace, commands: list[str]) -> dict:
    """Each strategy and k again with ``--repair linear``: ``repskip analyze`` chooses the layers
    (greedy-loss scores its candidates repaired) and fits a map per removed run on the same
    calibration text, under the analysis's masking for the diffusion model; ``verify --recipe``
    folds the maps and measures as for the plain rows."""
    out: dict = {}
    for kind in args.repair_kinds:
        for strategy in STRATEGIES:
            for k in range(1, args.max_k + 1):
                run = work / "runs-repair" / f"{kind}-{strategy}-k{k}"
                bar = ["--threshold", -1] if strategy == "paper" else []
                try:
                    repskip(["analyze", work / "models" / kind, "-o", run, "--calib", work / "data" / "calib.txt",
                             "--num-samples", 64, "--max-length", 256, "--strategy", strategy, "-k", k, *bar,
                             "--repair", "linear", "--search-samples", 16, "--device", args.device], commands,
                            run=not (run / "recipe.yaml").is_file())
                except subprocess.CalledProcessError as e:
                    out[f"{kind}/{strategy}/{k}"] = {"error": e.stdout.strip().splitlines()[-1]}
                    continue
                from repskip.recipe import load as load_recipe

                recipe = load_recipe(run / "recipe.yaml")
                folder = work / "verify" / f"{kind}-{strategy}-k{k}-linear"
                verify(work, args, kind, run / "recipe.yaml", folder, commands)
                bench = json.loads((folder / "report.json").read_text())["benchmarks"]["perplexity"]
                repair = recipe.resolved.repair
                out[f"{kind}/{strategy}/{k}"] = {
                    "recipe": str(run / "recipe.yaml"), "removed": list(recipe.resolved.remove),
                    "maps_at": sorted(m.layer for m in repair.maps) if repair is not None else [],
                    "verify": str(folder),
                    "retention": bench["retention"], "ci": bench["retention_ci95"], "base_ppl": bench["base"],
                    "ppl": bench["compressed"], "items": bench["items"]}
    return out


def heldout_paragraphs(work: Path, count: int, min_chars: int = 300) -> list[str]:
    """The first ``count`` held-out paragraphs of at least ``min_chars`` characters (headings
    and one-line answers are too short to prompt with or to score)."""
    paragraphs = (work / "data" / "heldout.txt").read_text("utf-8").split("\n\n")
    return [p.strip() for p in paragraphs if len(p.strip()) >= min_chars][:count]


# --- sample quality of the diffusion model ---------------------------------------------------------
def sample_quality(work: Path, args: argparse.Namespace, rows: dict) -> dict:
    """The diffusion model's sampler after each removal, on held-out prompts: generative
    perplexity under the trained AR model, agreement with the full model's tokens, distinct
    bigrams."""
    cache = work / "samples.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    import torch
    from repskip.pipeline import open_model
    from repskip.sampler import get_sampler

    handle = open_model(work / "models" / "diffusion")
    fam, tokenizer = handle.family, handle.family.load_tokenizer(handle.path)
    judge_handle = open_model(work / "models" / "ar")
    judge = judge_handle.load("float32", args.device)
    prompts = [tokenizer.decode(tokenizer(t)["input_ids"][: args.prompt_tokens])
               for t in heldout_paragraphs(work, args.prompts)]
    sampler = get_sampler(fam.default_sampler, fam)
    # sampled at temperature 1 with one seed for every model: greedy decoding of a model this
    # small repeats its most frequent tokens, and generative perplexity rewards that
    settings = {"gen_length": args.gen_length, "steps": args.gen_length, "block_length": args.gen_length,
                "temperature": args.temperature}

    def generate(remove: list[int]) -> list[list[int]]:
        model = handle.load("float32", args.device)
        if remove:
            fam.remove_layers(model, [i for i in range(handle.num_layers) if i not in set(remove)])
        return sampler.generate(model, tokenizer, prompts, family=fam, seed=args.seed, **settings).token_ids

    def judge_nll(outputs: list[list[int]]) -> tuple[float, int]:
        total, count = 0.0, 0
        for prompt, out in zip(prompts, outputs):
            if not out:
                continue
            p = tokenizer(prompt)["input_ids"]
            ids = torch.tensor([p + out], device=args.device)
            with torch.no_grad():
                logp = judge_handle.family.logits(judge, ids, torch.ones_like(ids)).float().log_softmax(-1)
            total -= float(logp[0, len(p) - 1:-1].gather(-1, ids[0, len(p):, None]).sum())
            count += len(out)
        return total, count

    def score(outputs: list[list[int]], full: list[list[int]] | None) -> dict:
        nll, count = judge_nll(outputs)
        bigrams = [tuple(o[i:i + 2]) for o in outputs for i in range(len(o) - 1)]
        same = [a == b for o, f in zip(outputs, full or outputs) for a, b in zip(o, f)]
        return {"gen_ppl": round(float(torch.tensor(nll / max(count, 1)).exp()), 3), "tokens": count,
                "distinct2": round(len(set(bigrams)) / max(len(bigrams), 1), 4),
                "agreement": round(sum(same) / max(len(same), 1), 4) if full is not None else 1.0}

    if done.get("settings") != settings:
        done = {"settings": settings}
    if "full" not in done:
        t0 = time.monotonic()
        full = generate([])
        done["full"] = {"outputs": full, **score(full, None), "seconds": round(time.monotonic() - t0, 1)}
        done["prompts"] = prompts
        cache.write_text(json.dumps(done))
    for key, row in rows.items():
        if not key.startswith("diffusion/") or "removed" not in row:
            continue
        tag = "skip" + "_".join(map(str, row["removed"]))
        if tag not in done:
            outputs = generate(row["removed"])
            done[tag] = {"outputs": outputs, **score(outputs, done["full"]["outputs"])}
            cache.write_text(json.dumps(done))
        row["samples"] = {k: v for k, v in done[tag].items() if k != "outputs"}
    log(f"full diffusion model: generative perplexity {done['full']['gen_ppl']} under the AR model; "
        f"example: {tokenizer.decode(done['full']['outputs'][0])!r}")
    return {"settings": settings, **{k: v for k, v in done["full"].items() if k != "outputs"}}


def fixed_ratio_nll(work: Path, args: argparse.Namespace, rows: dict) -> dict:
    """The diffusion model's masked-token NLL at each fixed mask ratio (the same seeded masks
    for every model) on the held-out items verify scored, for each distinct removal: how much
    a removal costs at low and at high noise."""
    cache = work / "fixed_ratio.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    import torch
    import torch.nn.functional as F
    from repskip.pipeline import open_model

    handle = open_model(work / "models" / "diffusion")
    fam, tokenizer = handle.family, handle.family.load_tokenizer(handle.path)
    mask_id = fam.mask_token_id(handle.ckpt.config)
    blocks = heldout_paragraphs(work, args.items)
    ids = [torch.tensor([tokenizer(b)["input_ids"][: args.seq_len]], device=args.device) for b in blocks]

    def measure(remove: list[int]) -> dict:
        model = handle.load("float32", args.device)
        if remove:
            fam.remove_layers(model, [i for i in range(handle.num_layers) if i not in set(remove)])
        out = {}
        for ratio in args.ratios:
            total, count = 0.0, 0
            for j, row in enumerate(ids):
                g = torch.Generator().manual_seed(args.seed * 7919 + j)
                masked = torch.rand(row.shape, generator=g) < ratio
                masked[0, int(torch.randint(row.shape[1], (1,), generator=g))] = True
                masked = masked.to(row.device)
                with torch.no_grad():
                    logits = fam.token_logits(model, torch.where(masked, mask_id, row), torch.ones_like(row))
                total += float(F.cross_entropy(logits[masked].float(), row[masked], reduction="sum"))
                count += int(masked.sum())
            out[str(ratio)] = total / count
        return out

    if "full" not in done or sorted(done["full"]) != sorted(map(str, args.ratios)):
        done = {"full": measure([])}
    for key, row in rows.items():
        if key.startswith("diffusion/") and "removed" in row:
            tag = "skip" + "_".join(map(str, row["removed"]))
            if tag not in done:
                done[tag] = measure(row["removed"])
                cache.write_text(json.dumps(done))
            row["fixed_ratio_retention"] = {r: round(float(torch.tensor(done["full"][r] - v).exp()), 4)
                                            for r, v in done[tag].items()}
    cache.write_text(json.dumps(done))
    return done["full"]


def floors(work: Path, args: argparse.Namespace) -> dict:
    """What a model that ignores context scores on the items verify measured: the unigram
    distribution of the training tokens (add-one smoothed), and the uniform guess. For both
    objectives a context-free predictor's loss is the unigram cross-entropy (the
    masked-diffusion bound of a predictor that ignores the visible tokens is exactly it), so
    ``(unigram - NLL) / (unigram - base NLL)`` is the share of what context modelling gained
    that survives a removal, comparable between a strong and a weak model."""
    import math

    import torch
    from repskip import registry
    from repskip.pipeline import open_model
    from repskip.textio import tokenize_prefix

    handle = open_model(work / "models" / "ar")
    tokenizer = handle.family.load_tokenizer(handle.path)
    vocab = len(tokenizer)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for file in sorted((work / "data" / "train").iterdir()):
        for piece in file.read_text("utf-8").split("\n\n"):
            counts += torch.bincount(torch.tensor(tokenizer(piece)["input_ids"] or [0]), minlength=vocab).double()
    logp = ((counts + 1) / (counts.sum() + vocab)).log()
    items = registry.create("benchmarks", "perplexity").load(work / "data" / "heldout.txt")[: args.items]
    ids = torch.tensor([t for it in items for t in tokenize_prefix(tokenizer, it.prompt, args.seq_len)])
    return {"unigram_nll": round(float(-logp[ids].mean()), 4), "uniform_nll": round(math.log(vocab), 4),
            "tokens": int(ids.numel())}


def context_kept(row: dict, unigram: float) -> tuple[float | None, list[float] | None]:
    """The share of the base model's gain over a context-free predictor that survives (see
    floors), and the retention interval mapped through the same formula (the base held at its
    estimate): 1 - ln(1 / retention) / gain. None when the base has no gain to keep (a model
    trained too little to beat token frequencies)."""
    import math

    gain = unigram - math.log(row["base_ppl"])
    if gain <= 0:
        return None, None

    def share(retention: float) -> float:
        return round(1 - math.log(1 / retention) / gain, 4)

    return share(row["retention"]), [share(row["ci"][0]), share(row["ci"][1])]


def retention_figure(work: Path, rows: dict, max_k: int) -> Path:
    """Against k, a column per model and a line per strategy: retention with its 95% interval
    (top), and the share of the gain over a context-free predictor kept (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row", sharex=True)
    for col, kind in enumerate(KINDS):
        for n, strategy in enumerate(STRATEGIES):
            shift = (n - (len(STRATEGIES) - 1) / 2) * 0.06  # strategies that pick the same layers stay visible
            pts = [(int(k) + shift, r) for key, r in rows.items() for kd, st, k in [key.split("/")]
                   if kd == kind and st == strategy and "retention" in r]
            if not pts:
                continue
            ks = [0.0] + [k for k, _ in pts]
            top = axes[0, col]
            line, = top.plot(ks, [1.0] + [r["retention"] for _, r in pts], marker="osD^"[n], label=strategy)
            top.fill_between(ks, [1.0] + [r["ci"][0] for _, r in pts], [1.0] + [r["ci"][1] for _, r in pts],
                             color=line.get_color(), alpha=0.15)
            if all(r.get("context_kept") is not None for _, r in pts):
                axes[1, col].plot(ks, [1.0] + [r["context_kept"] for _, r in pts], marker="osD^"[n],
                                  color=line.get_color())
                axes[1, col].fill_between(ks, [1.0] + [r["context_kept_ci"][0] for _, r in pts],
                                          [1.0] + [r["context_kept_ci"][1] for _, r in pts],
                                          color=line.get_color(), alpha=0.15)
        axes[0, col].set_title(TITLES[kind])
        axes[1, col].set_xlabel("layers removed (k)")
        for ax in axes[:, col]:
            ax.axhline(0.9, color="grey", lw=0.8, ls="--")
            ax.set_xticks(range(max_k + 1))
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("retention: base PPL / PPL")
    axes[1, 0].set_ylabel("gain over unigram kept")
    axes[0, 0].legend(loc="lower left")
    fig.tight_layout()
    path = work / "retention_vs_k.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(work: Path, rows: dict, commands: list[str], strategy: str) -> None:
    """``repskip compare``: AR against diffusion (mask sweep) with the retention reports of
    ``strategy``; and AR against the diffusion model's sampling trajectories."""
    labels = ["--label", TITLES["ar"], "--label", TITLES["diffusion"]]
    reports = [Path(r["verify"]) for key, r in rows.items() if "verify" in r and f"/{strategy}/" in key]
    repskip(["compare", work / "runs" / "ar", work / "runs" / "diffusion", *reports, *labels, "-o", work / "compare"],
            commands, run=not (work / "compare" / "compare.json").is_file())
    repskip(["compare", work / "runs" / "ar", work / "runs" / "diffusion-sampling", *labels[:3],
             "diffusion (sampling trajectory)", "-o", work / "compare-sampling"], commands,
            run=not (work / "compare-sampling" / "compare.json").is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("~/.cache/repskip/study").expanduser())
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for training, analysis and measurement")
    ap.add_argument("--sequential", action="store_true", help="train one model after the other, all threads each")
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--items", type=int, default=48, help="held-out perplexity items (of about 1,800 characters)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0, help="diffusion sampling temperature (seeded)")
    ap.add_argument("--ratios", type=lambda v: [float(x) for x in v.split(",")], default=[0.15, 0.5, 0.85],
                    help="fixed mask ratios for the diffusion model's per-ratio NLL")
    ap.add_argument("--compare-strategy", default="block-influence", choices=STRATEGIES,
                    help="whose retention reports repskip compare overlays")
    ap.add_argument("--record", action="store_true", help="also write bench/results/ar_vs_diffusion.json")
    ap.add_argument("--stop-after", choices=["train"], help="stop once the models are trained (a fixture)")
    ap.add_argument("--kinds", default=",".join(KINDS), type=lambda v: [k for k in v.split(",") if k],
                    help="with --stop-after train: which models to train (ar, diffusion)")
    ap.add_argument("--repair-kinds", default="diffusion", type=lambda v: [k for k in v.split(",") if k],
                    help="models whose removals are measured again with --repair linear: ar, diffusion, both "
                         "(ar,diffusion) or none ('')")
    args = ap.parse_args()
    work = args.work.expanduser().resolve()
    if set(args.kinds) - set(KINDS) or not args.kinds or set(args.repair_kinds) - set(KINDS):
        raise SystemExit(f"--kinds and --repair-kinds take {', '.join(KINDS)}")
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    t0 = time.monotonic()
    data = build_data(work)
    train_tokenizer(work, args.vocab)
    initial_models(work, args)
    training = train(work, args, commands)
    commands[:] = [training[k]["command"] for k in args.kinds if "command" in training[k]
                   and training[k]["command"] not in commands] + commands
    for kind, rec in training.items():
        log(f"{kind}: {rec['tokens']:,} tokens in {rec['seconds']:.0f} s; held-out loss "
            f"{rec['held_out_lm'][0]:.3f} -> {rec['held_out_lm'][1]:.3f}")
    if args.stop_after == "train":
        return
    if sorted(args.kinds) != sorted(KINDS):
        raise SystemExit("--kinds leaves a model out: the study needs both (use it with --stop-after train)")
    analyze(work, args, commands)
    rows = removals(work, args, commands)
    verify_all(work, args, rows, commands)
    fixed = repaired(work, args, commands)
    full_samples = sample_quality(work, args, rows)
    full_ratio = fixed_ratio_nll(work, args, rows)
    floor = floors(work, args)
    for row in [*rows.values(), *fixed.values()]:
        if "ppl" in row:
            row["context_kept"], row["context_kept_ci"] = context_kept(row, floor["unigram_nll"])
    retention_figure(work, rows, args.max_k)
    compare(work, rows, commands, args.compare_strategy)
    result = {"schema_version": _common.SCHEMA_VERSION, "kind": "repskip.study.ar_vs_diffusion",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": data, "training": training, "rows": rows, "repaired": fixed, "full_samples": full_samples,
              "full_fixed_ratio_nll": full_ratio, "floors": floor,
              "commands": commands, "seconds": round(time.monotonic() - t0, 1),
              "machine": _common.machine(), "git": _common.GIT_AT_START,
              "command": shlex.join([os.path.relpath(sys.executable), *sys.argv])}
    (work / "study.json").write_text(json.dumps(result, indent=1))
    if args.record:
        (_common.REPO / "bench" / "results" / "ar_vs_diffusion.json").write_text(json.dumps(result, indent=1))
    print_table(rows)
    print("\nwith --repair linear:")
    print_table(fixed)


def print_table(rows: dict) -> None:
    print(f"{'model':<10} {'strategy':<16} {'k':>2}  {'removed':<14} {'retention':>9}  95% CI          samples")
    for key, r in rows.items():
        kind, strategy, k = key.split("/")
        if "retention" not in r:
            print(f"{kind:<10} {strategy:<16} {k:>2}  {r.get('error', '')[:60]}")
            continue
        ci = r.get("ci") or [float("nan")] * 2
        s = r.get("samples")
        extra = f"context kept {r['context_kept']:.3f}" if r.get("context_kept") is not None else "no gain to keep"
        if s:
            extra += f"; gen-ppl {s['gen_ppl']}, agree {s['agreement']:.2f}"
        fixed = r.get("fixed_ratio_retention")
        if fixed:
            extra += "; at ratio " + ", ".join(f"{k}: {v:.3f}" for k, v in fixed.items())
        print(f"{kind:<10} {strategy:<16} {k:>2}  {str(r['removed']):<14} {r['retention']:>9.3f}  "
              f"[{ci[0]:.3f}, {ci[1]:.3f}]  {extra}")


if __name__ == "__main__":
    main()
