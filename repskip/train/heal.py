"""``repskip heal``: a short training run that teaches a compressed model's layers around each
cut to take over what the removed layers did.

The student is the compressed checkpoint; the teacher, when given, the model it was cut
from. Either LoRA adapters (peft) on the linear layers of the chosen decoder layers, merged
into their weights at the end, or full fine-tuning of those layers. The loss is the family's
training objective (next-token for autoregressive families, masked diffusion for LLaDA and
Dream) as knowledge distillation from the teacher, plain LM loss, or a mix
(repskip.train.objective). AdamW with linear warm-up then cosine decay to zero, gradient
accumulation, gradient clipping, fp32 or bf16 autocast, all through accelerate so the same
run scales to several processes (``accelerate launch``, ``torchrun``): data parallel, or with
``fsdp`` each process holding a share of the model (repskip.train.shard).

Only the trained tensors change: the output is the input checkpoint with those tensors'
bytes replaced, in their own dtype, written through compress's writer (atomic, sharded,
the input's side files kept), with ``heal.json`` (the training record) beside them. A
resumable state is kept beside the output while the run lasts (repskip.train.state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import card
from ..errors import RepskipError
from ..outputs import MARKER, check_output, ensure_dir
from . import shard as _shard
from . import state as _state
from .data import TrainData, pack, read_documents
from .objective import LOSSES, combine, get_objective, losses

HEAL_SCHEMA = 1
RECORD_NAME = "heal.json"
METHODS = ("lora", "full")
PRECISIONS = ("fp32", "bf16")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class HealSettings:
    """Everything that decides the healed weights (and so must match for a resume)."""

    method: str = "lora"
    layers: str = "around-cuts"  # around-cuts, all, or comma-separated layer indices
    around: int = 1  # around-cuts: kept layers taken on each side of a cut
    train_embeddings: bool = False  # full: also the parameters outside the layers (embeddings, final norm, head)
    rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    loss: str = "kd"  # kd, lm or mix
    kd_weight: float = 0.5  # mix: the weight of kd
    temperature: float = 1.0
    steps: int = 300
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seq_len: int = 256
    eval_sequences: int = 16
    precision: str = "fp32"
    seed: int = 0

    def check(self) -> None:
        def bad(text: str) -> None:
            raise RepskipError(text)

        if self.method not in METHODS:
            bad(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.loss not in LOSSES:
            bad(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            bad(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "rank", "around"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            bad(f"--warmup is a fraction of the steps, from 0 to below 1, got {self.warmup}")
        if not 0 <= self.kd_weight <= 1:
            bad(f"--kd-weight must be from 0 to 1, got {self.kd_weight}")
        if not self.temperature > 0:
            bad(f"--temperature must be positive, got {self.temperature}")
        if self.train_embeddings and self.method != "full":
            bad("--train-embeddings trains the embeddings, final norm and output head whole: it needs --method full")
        if not 0 <= self.lora_dropout < 1:
            bad(f"--lora-dropout must be from 0 to below 1, got {self.lora_dropout}")


@dataclass
class HealResult:
    output: Path
    record: dict
    layers: list[int] = field(default_factory=list)
    wrote: bool = True  # False in the other processes of a multi-process run: the main one writes


def lr_at(settings: HealSettings, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up, cosine to 0."""
    warm = int(settings.warmup * settings.steps)
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(settings.steps - warm, 1)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _heal_state(folder: Path) -> bool:
    """Whether ``folder`` is a state folder a heal made (its repskip marker says heal)."""
    try:
        return json.loads((folder / MARKER).read_text("utf-8")).get("command") == "heal"
    except (OSError, ValueError, AttributeError):
        return False


def state_folder(output: Path) -> Path:
    """Where a heal into ``output`` keeps its resumable state while it runs."""
    return output.parent / f".{output.name}.heal-state"


# --- which layers train ----------------------------------------------------------------------
def cut_neighbours(removed: Sequence[int], total: int, around: int) -> list[int]:
    """New indices of the kept layers within ``around`` of each maximal run of ``removed``
    (old indices, of a model with ``total`` layers)."""
    gone = set(removed)
    kept = [i for i in range(total) if i not in gone]
    new = {old: n for n, old in enumerate(kept)}
    chosen: set[int] = set()
    for i in sorted(gone):
        if i - 1 in gone:
            continue  # not the start of a run
        end = i
        while end + 1 in gone:
            end += 1
        before = [j for j in kept if j < i][-around:]
        after = [j for j in kept if j > end][:around]
        chosen.update(new[j] for j in before + after)
    return sorted(chosen)


def choose_layers(handle: Any, settings: HealSettings) -> list[int]:
    n = handle.num_layers
    if settings.layers == "all":
        return list(range(n))
    if settings.layers == "around-cuts":
        from ..compress.files import RECIPE_NAME
        from ..recipe import load as load_recipe

        path = handle.path / RECIPE_NAME
        if not path.is_file():
            raise RepskipError(f"{handle.path} has no {RECIPE_NAME} saying where layers were cut; pass "
                               "--layers all or --layers with the indices to train")
        resolved = load_recipe(path).resolved
        if resolved is None:
            raise RepskipError(f"{path} is not resolved: it does not say which layers were cut; pass --layers")
        removed = list(resolved.remove)
        return cut_neighbours(removed, n + len(removed), settings.around)
    try:
        layers = sorted({int(x) for x in settings.layers.split(",") if x.strip()})
    except ValueError:
        raise RepskipError(f"--layers takes around-cuts, all or comma-separated layer indices, got "
                           f"{settings.layers!r}") from None
    bad = [i for i in layers if not 0 <= i < n]
    if not layers or bad:
        raise RepskipError(f"--layers: {bad[0] if bad else 'no layer'} is not a layer of this model "
                           f"(0..{n - 1})")
    return layers


def _layer_modules(family: Any, model: Any, layers: Sequence[int]) -> tuple[list[str], list[str]]:
    """(names of the nn.Linear modules in ``layers``, names of all their parameters)."""
    owned = {}
    for i in layers:
        for module in family.decoder_layers(model)[i].modules():
            owned[id(module)] = module
    linears = [name for name, m in model.named_modules() if id(m) in owned and _is_linear(m)]
    params = [name for name, m in model.named_modules() if id(m) in owned
              for pname, _ in m.named_parameters(recurse=False) for name in [f"{name}.{pname}"]]
    return linears, params


def _is_linear(module: Any) -> bool:
    """A linear map LoRA can adapt: torch's Linear, or transformers' GPT-2 Conv1D."""
    return isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _digest(param: torch.Tensor) -> str:
    return hashlib.sha1(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def attach_trainable(family: Any, model: Any, layers: Sequence[int],
                     settings: HealSettings) -> tuple[Any, list[str], Callable[[], None]]:
    """Make the chosen parameters trainable, in place: LoRA adapters (peft) on the linear maps
    of ``layers``, or those layers' own weights. Returns the model, the names of the weights
    that will change and what to call when training ends (LoRA: merge the adapters in)."""
    linears, params = _layer_modules(family, model, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.method == "full":
        named = dict(model.named_parameters())
        if settings.train_embeddings:  # with every layer, this is the whole model: training from scratch
            in_layers = set(_layer_modules(family, model, range(len(family.decoder_layers(model))))[1])
            params += [name for name in named if name not in in_layers]
        for name in params:
            named[name].requires_grad_(True)
        return model, params, lambda: None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RepskipError("--method lora needs peft: pip install 'repskip[heal]'") from None
    # peft adapts the decoder layers through a holder of its own: given a transformers model of
    # a mixture-of-experts type, peft would read a name like shared_expert.down_proj as a
    # transformers 4 expert and adapt every layer's fused experts instead
    stack = family.decoder_layers(model)
    path = next(name for name, m in model.named_modules() if m is stack)
    holder = torch.nn.Module()
    holder.layers = stack
    targets = ["layers" + name[len(path):] for name in linears]
    torch.manual_seed(settings.seed)  # LoRA's A matrices start random: the same for the same seed
    config = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets, bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(holder, config)  # the adapters go into the model's own layers, in place

    def merge() -> None:
        wrapped.merge_and_unload()

    return model, [f"{name}.weight" for name in linears], merge


# --- checks before any work --------------------------------------------------------------------
def check_teacher(student: Any, teacher: Any, student_tok: Any, teacher_tok: Any) -> None:
    kinds = [(h.family_name, h.ckpt.config.get("model_type")) for h in (teacher, student)]
    if kinds[0] != kinds[1]:
        name = [f"{t} ({f})" if t and t != f else f for f, t in kinds]
        raise RepskipError(f"the teacher is a {name[0]} model and the student {name[1]}: distillation needs the "
                           "model the student was cut from")
    sv, tv = student.family.vocab_size(student.ckpt.config), teacher.family.vocab_size(teacher.ckpt.config)
    if sv != tv or student_tok.get_vocab() != teacher_tok.get_vocab():
        raise RepskipError(f"the teacher's vocabulary ({tv} tokens) is not the student's ({sv}): distillation "
                           "compares their predictions token by token; give the model the student was cut from")


def _fingerprint(obj: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --- the run -----------------------------------------------------------------------------------
class _Order:
    """Which training sequence the i-th draw is: a fresh seeded permutation each epoch."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.perms = count, seed, {}

    def __getitem__(self, i: int) -> int:
        epoch = i // self.count
        if epoch not in self.perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.perms = {epoch: torch.randperm(self.count, generator=g)}
        return int(self.perms[epoch][i % self.count])


def _generator(*parts: int) -> torch.Generator:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + p) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def heal(
    student: str | Path,
    output: str | Path,
    *,
    data: str,
    teacher: str | Path | None = None,
    settings: HealSettings | None = None,
    text_field: str | None = None,
    eval_every: int = 50,
    save_every: int = 50,
    resume: bool = True,
    force: bool = False,
    device: str = "cpu",
    fsdp: bool = False,
    max_shard_size: int | None = None,
    say: Callable[[str], None] = lambda text: None,
    progress: Callable[..., None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> HealResult:
    """Heal ``student`` into ``output`` (see the module doc). ``fsdp`` shards the model over the
    processes of the launch (repskip.train.shard). ``on_step(step)`` is called after each
    optimiser step and its state save (tests stop a run there)."""
    from ..compress.files import DEFAULT_SHARD_SIZE, attach_data, plan_tensors, write_checkpoint
    from ..engine.model import open_model
    from ..versions import versions

    settings = settings or HealSettings()
    settings.check()
    if eval_every < 1 or save_every < 1:
        raise RepskipError("--eval-every and --save-every must be at least 1")
    output = Path(output)
    s_handle = open_model(student)
    s_handle.require_weights("heal")
    t_handle = open_model(teacher) if teacher is not None else None
    if t_handle is not None:
        t_handle.require_weights("heal (the teacher)")
    if settings.loss in ("kd", "mix") and t_handle is None:
        raise RepskipError(f"--loss {settings.loss} distils from a teacher: pass --teacher MODEL (the model the "
                           "student was cut from), or use --loss lm")
    inputs = [s_handle.path] + ([t_handle.path] if t_handle else [])
    data_path = Path(data).expanduser()
    check_output(output, force, inputs + ([data_path] if not data.startswith("hub:") else []))
    layers = choose_layers(s_handle, settings)
    objective = get_objective(s_handle.family.training_objective, s_handle.family)
    family, config = s_handle.family, s_handle.ckpt.config

    try:
        from accelerate import Accelerator
    except ImportError:
        raise RepskipError("repskip heal needs accelerate: pip install 'repskip[heal]'") from None
    # bf16 is torch's autocast below, not accelerate's mixed_precision flag: that flag is fixed for
    # the life of the process, and a library caller may heal twice with different precisions
    accelerator = Accelerator(cpu=device == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:  # one voice for the run
        say, progress = (lambda text: None), None
    run_device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    if fsdp and world < 2:
        raise RepskipError("--fsdp shards the model over the processes of a launch and this run has one: start it "
                           "with torchrun --nproc_per_node N (or accelerate launch), or drop --fsdp")

    def load(handle: Any, dtype: str) -> Any:
        """The model to train or distil from. Sharded: the main process reads it into CPU memory
        and the others build it without weights, to receive their shares of it (each process
        reads it itself where its family cannot build one)."""
        if fsdp and not accelerator.is_main_process and _shard.builds_empty(handle.family):
            return _shard.empty_like_loaded(handle.family, handle.ckpt.config, getattr(torch, dtype))
        return handle.load(dtype=dtype, device="cpu" if fsdp else run_device)

    tokenizer = family.load_tokenizer(s_handle.path)
    t_tokenizer = t_handle.family.load_tokenizer(t_handle.path) if t_handle else None
    if t_handle is not None:
        check_teacher(s_handle, t_handle, tokenizer, t_tokenizer)
    context = family.context_length(config)
    if context is not None and settings.seq_len > context:
        raise RepskipError(f"--seq-len {settings.seq_len} is longer than the model's context ({context})")
    docs, source = read_documents(data, text_field)
    train_data: TrainData = pack(tokenizer, docs, source, settings.seq_len, settings.eval_sequences)
    say(f"data: {train_data.train.shape[0]} training and {train_data.held_out.shape[0]} held-out sequences of "
        f"{settings.seq_len} tokens from {source}")

    identity = {"settings": asdict(settings), "student": s_handle.ckpt.fingerprint(),
                "teacher": t_handle.ckpt.fingerprint() if t_handle else None, "data": train_data.tokens_sha256,
                "world": world}
    key = _fingerprint(identity)
    folder = state_folder(output)
    saved = None
    if folder.exists() or folder.is_symlink():
        if folder.is_symlink() or not _heal_state(folder):
            raise RepskipError(f"{folder} exists and is not a heal's state folder; move it away or choose another "
                               "output")
        saved = _state.peek(folder) if resume else None
        if saved is not None and saved.get("key") != key:
            differs = sorted(k for k, v in asdict(settings).items() if saved.get("settings", {}).get(k) != v)
            what = f"settings ({', '.join(differs)})" if differs else "model, teacher, data or process count"
            raise RepskipError(f"{folder} holds an unfinished heal of other {what}; rerun it as it was, or pass "
                               "--no-resume to start afresh")
    if accelerator.is_main_process:  # never an input, inside one or holding one (ensure_dir refuses)
        ensure_dir(folder, inputs + ([data_path] if not data.startswith("hub:") else []), command="heal")
    accelerator.wait_for_everyone()

    say(f"loading {s_handle.path.name}" + (f" and the teacher {t_handle.path.name}" if t_handle else ""))
    model = load(s_handle, "float32")
    # what the training may touch, as it was: after it, whatever differs is written back (peft
    # may wrap more than the linear maps it was given: a mixture of experts' fused weights)
    before = {name: _digest(p) for name, p in model.named_parameters()
              if name in set(_layer_modules(family, model, layers)[1]) or settings.train_embeddings} \
        if accelerator.is_main_process else {}
    model, _, finish = attach_trainable(family, model, layers, settings)
    model.train()
    teacher_model = None
    if t_handle is not None:
        teacher_model = load(t_handle, "bfloat16" if settings.precision == "bf16" else "float32")
        teacher_model.eval().requires_grad_(False)
    holds = None
    if fsdp:
        device_mesh = _shard.mesh(accelerator.device.type, world)
        for handle, module in ((s_handle, model), (t_handle, teacher_model)):
            if module is None:
                continue
            if _shard.builds_empty(handle.family):
                _shard.shard_from_main(handle.family, module, device_mesh, accelerator.device,
                                       accelerator.is_main_process)
            else:
                _shard.shard(handle.family, module, device_mesh)
        holds = _shard.held(model)
        say(f"sharded over {world} processes: this one holds {holds[0]:,} of the model's {holds[1]:,} parameters")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    say(f"training {settings.method} on layers {layers}" + (" and the embeddings, final norm and head"
        if settings.train_embeddings else "") + f": {n_trainable:,} parameters")
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    start, history = 0, {"train": [], "eval": []}
    if saved is not None:
        _state.restore(folder, accelerator.unwrap_model(model), optimizer)
        start, history = int(saved["step"]), saved["history"]
        say(f"resuming from step {start} ({folder})")
    # the training time of the steps a resumed state holds (a state from before it was kept: 0)
    before_seconds = float(saved.get("seconds", 0.0)) if saved is not None else 0.0
    if not fsdp:  # data parallel: accelerate wraps the model (DDP) when there are several processes
        model, optimizer = accelerator.prepare(model, optimizer)

    order = _Order(train_data.train.shape[0], settings.seed)
    bf16 = settings.precision == "bf16"

    def autocast():
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    held = train_data.held_out

    def micro_batch(step: int, micro: int) -> torch.Tensor:
        base = ((step * settings.grad_accum + micro) * world + rank) * settings.batch_size
        return train_data.train[[order[base + j] for j in range(settings.batch_size)]]

    def parts_for(ids: torch.Tensor, gen: torch.Generator, grad: bool) -> dict[str, torch.Tensor]:
        batch = objective.prepare(ids, torch.ones_like(ids), family=family, config=config, generator=gen)
        with autocast():
            t_logits = None
            if teacher_model is not None:
                with torch.no_grad():
                    t_logits = objective.logits(t_handle.family, teacher_model, batch)
            with torch.set_grad_enabled(grad):
                s_logits = objective.logits(family, model, batch)
                return losses(batch, s_logits, t_logits, settings.temperature)

    def evaluate(step: int) -> None:
        if not len(held):
            return
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for j in range(0, len(held), settings.batch_size):
                parts = parts_for(held[j : j + settings.batch_size], _generator(settings.seed, 7, j), False)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(held[j : j + settings.batch_size])
        model.train()
        row = {"step": step, **{k: round(v / len(held), 5) for k, v in sums.items()}}
        history["eval"].append(row)
        say(f"step {step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))

    t0 = time.monotonic()
    if start == 0:
        evaluate(0)
    for step in range(start, settings.steps):
        lr = lr_at(settings, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, float] = {}
        for micro in range(settings.grad_accum):
            ids = micro_batch(step, micro)
            gen = _generator(settings.seed, step, micro, rank)
            # gradients are synchronised across processes on the last micro-batch only
            with _shard.gradient_sync(model, micro == settings.grad_accum - 1, accelerator.no_sync):
                parts = parts_for(ids, gen, True)
                accelerator.backward(combine(parts, settings.loss, settings.kd_weight) / settings.grad_accum)
            parts["loss"] = combine(parts, settings.loss, settings.kd_weight)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / settings.grad_accum
        if settings.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        history["train"].append({"step": done, "lr": lr, **{k: round(v, 5) for k, v in totals.items()}})
        if progress is not None:
            progress(done, settings.steps, f"loss {totals['loss']:.4f}")
        if done % eval_every == 0 or done == settings.steps:
            evaluate(done)
        # a sharded state is gathered whole: every process takes part, the main one writes
        if done % save_every == 0 and done < settings.steps and (fsdp or accelerator.is_main_process):
            _state.save(folder, done, accelerator.unwrap_model(model), optimizer.optimizer
                        if hasattr(optimizer, "optimizer") else optimizer,
                        {"key": key, "settings": asdict(settings), "history": history,
                         "seconds": before_seconds + time.monotonic() - t0},
                        write=accelerator.is_main_process)
        if on_step is not None:
            on_step(done)
    seconds = time.monotonic() - t0

    model = accelerator.unwrap_model(model)
    record = {
        "schema_version": HEAL_SCHEMA, "kind": "repskip.heal",
        "student": s_handle.info(), "teacher": t_handle.info() if t_handle else None,
        "objective": family.training_objective, "data": train_data.record(), "settings": asdict(settings),
        "layers": layers, "trainable_parameters": n_trainable, "history": history,
        # the training's time over every run that took part, and this run's share of it
        "seconds": round(before_seconds + seconds, 1), "seconds_this_run": round(seconds, 1),
        "resumed_from": int(saved["step"]) if saved else None, "processes": world, "fsdp": fsdp,
        "held_parameters": holds and holds[0],
        "device": run_device, "versions": versions(("torch", "transformers", "peft", "accelerate")),
    }
    if fsdp:  # the trained weights gathered whole (every process takes part), into an unsharded copy
        trained = {name: _shard.full(p) for name, p in model.named_parameters() if p.requires_grad}
        del model, optimizer, teacher_model, trainable
        if accelerator.is_main_process:
            model = s_handle.load(dtype="float32", device="cpu")
            model, _, finish = attach_trainable(family, model, layers, settings)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in trained:
                        p.copy_(trained.pop(name))
            if trained:
                raise RepskipError(f"the sharded run trained {sorted(trained)[0]}, which the unsharded model lacks: "
                                   "please report this")
    if not accelerator.is_main_process:  # the main process merges, writes and reports
        return HealResult(output, record, layers, wrote=False)
    finish()  # LoRA: the adapters merged into the weights
    model.eval()
    named = dict(model.named_parameters())
    record["tensors"] = changed = sorted(name for name, digest in before.items() if _digest(named[name]) != digest)

    ckpt = s_handle.ckpt
    replacements = {}
    for name in changed:
        for disk, value in family.disk_tensors(config, name, named[name].detach().cpu(), ckpt.tensors).items():
            entry = ckpt.tensors.get(disk)
            if entry is None:
                raise RepskipError(f"trained parameter {name} has no tensor {disk} in {ckpt.path}")
            replacements[disk] = value.to(SAFETENSORS_DTYPES[entry.dtype]).contiguous().view(torch.uint8).numpy().tobytes()
    n = s_handle.num_layers
    planned = attach_data(plan_tensors(ckpt, family.layer_prefix(config), list(range(n)), n), replacements)
    probe = held[:2] if len(held) else train_data.train[:2]

    def reload_check(folder_written: Path) -> None:
        """The written weights give the trained model's logits (a wrong name or dtype would not)."""
        from ..engine.model import open_model as _open

        again = _open(folder_written).load(dtype="float32")
        with torch.no_grad():
            mask = torch.ones_like(probe)
            a = family.logits(model.float(), probe, mask).float()
            b = family.logits(again, probe, mask).float()
        diff = float((a - b).abs().max())
        record["written_max_logit_diff"] = diff
        exact = all(ckpt.tensors[disk].dtype == "F32" for disk in replacements)
        if exact and diff > 1e-3 * max(float(a.abs().max()), 1.0):
            raise RepskipError(f"the written checkpoint's logits differ from the trained model's by {diff:.3g}: "
                               "nothing was written; please report this")
        (folder_written / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
        card.write(folder_written, output, card.heal_card(s_handle.path, record, output.name))

    write_checkpoint(ckpt, planned, dict(config), output, {}, max_shard_size=max_shard_size or DEFAULT_SHARD_SIZE,
                     force=force, command="heal", inputs=inputs, finish=reload_check)
    if _heal_state(folder):  # ours: made by ensure_dir above, checked again before it goes
        shutil.rmtree(folder, ignore_errors=True)
    return HealResult(output, record, layers)
