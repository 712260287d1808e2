"""Whether a model runs whole in memory or one decoder layer at a time from disk.

``--offload auto`` (the default) estimates what running the model whole needs (its weights in
the run's dtype, with headroom, and the calibration states) from the checkpoint's tensor
headers, before anything is loaded, and compares it with the memory the device has free (or
``--max-memory``). When it does not fit, the model is loaded by transformers' big-model path
(accelerate) with every decoder layer, the input embeddings and the LM head left on disk,
read from the checkpoint's own shards as they are needed; the stages then run it one layer at a
time over every batch (repskip.engine.layerwise), so only one layer's weights are in memory at
once; the calibration states get what the layers leave and spill to the scratch folder beyond
it (repskip.engine.states). ``none`` refuses, in one line, a model that does not fit instead of letting the kernel
kill the process; ``sequential`` always streams.

Tensors transformers has to convert on load (fused MoE experts, say) are written to an offload
folder: a fresh folder repskip makes (inside ``--offload-folder`` if given) and removes after
the run, so nothing a user put there is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RepskipError

MODES = ("auto", "none", "sequential")
HEADROOM = 1.2  # the weights in memory need this much more than their bytes (buffers, the run's own tensors)
STATE_COPIES = 4  # calibration states a sweep keeps at once (inputs, outputs, the pruned model's, targets)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


@dataclass(frozen=True)
class Need:
    """What running a checkpoint needs, in bytes, estimated from its tensor headers."""

    weights: int  # every tensor, in the run's dtype
    largest_layer: int  # the largest decoder layer's tensors
    outside_layers: int  # embeddings, head, final norm
    states: int  # the calibration states a sweep keeps

    @property
    def whole(self) -> int:
        return int(self.weights * HEADROOM) + self.states

    @property
    def sequential(self) -> int:
        """One layer at a time, without the calibration states (which spill to disk beyond
        what this leaves free)."""
        return int(self.largest_layer * HEADROOM) + self.outside_layers


def estimate(handle: Any, dtype: Any, tokens: int) -> Need:
    """``handle``'s need when run in ``dtype`` (None: as stored) over ``tokens`` calibration tokens."""
    family, config = handle.family, handle.ckpt.config
    size = None if dtype is None else _torch_itemsize(dtype)
    prefix = family.layer_prefix(config)
    per_layer: dict[int, int] = {}
    total = outside = 0
    for name, entry in handle.ckpt.tensors.items():
        stored = _ITEMSIZE.get(entry.dtype, 4)
        n = entry.nbytes if size is None or entry.dtype not in ("F32", "F16", "BF16", "F64") else entry.nbytes // stored * size
        total += n
        if name.startswith(prefix):
            index = name[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                per_layer[int(index)] = per_layer.get(int(index), 0) + n
                continue
        outside += n
    hidden = family.hidden_size(config)
    return Need(total, max(per_layer.values(), default=0), outside, STATE_COPIES * tokens * hidden * (size or 4))


def _torch_itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def available(device: str) -> int:
    """Bytes free on ``device``: the CPU's available memory (within a cgroup's limit), or a GPU's free memory."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            free = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit, usage = (Path("/sys/fs/cgroup") / name for name in ("memory.max", "memory.current"))
        text = limit.read_text().strip()
        if text != "max":
            free = min(free, int(text) - int(usage.read_text()))
    return free


def choose(mode: str, need: Need, free: int, what: str, budget: bool = False) -> str:
    """"whole" or "sequential" for ``mode``, or a one-line refusal naming the sizes and the fix
    (``budget``: ``free`` is the user's --max-memory, not what the machine has)."""
    if mode not in MODES:
        raise RepskipError(f"unknown --offload {mode!r}; choose one of {', '.join(MODES)}")
    if need.sequential > free:
        fix = "raise --max-memory" if budget else "use a smaller --dtype, or a machine with more memory"
        raise RepskipError(
            f"{what} needs about {_gb(need.sequential)} even one layer at a time (its largest layer "
            f"{_gb(need.largest_layer)} with headroom, embeddings and head {_gb(need.outside_layers)}) and "
            f"{'--max-memory allows' if budget else 'the machine has'} {_gb(free)}: {fix}")
    if mode == "sequential" or (mode == "auto" and need.whole > free):
        return "sequential"
    if mode == "none" and need.whole > free:
        raise RepskipError(
            f"{what} needs about {_gb(need.whole)} in memory (weights {_gb(need.weights)} and calibration states "
            f"{_gb(need.states)}) and {_gb(free)} is available: use --offload sequential (or auto) to run it one "
            "layer at a time from disk")
    return "whole"


def check_folder(parent: str | os.PathLike | None, model_path: Path) -> Path | None:
    """``parent`` (for --offload-folder) resolved, or a one-line refusal: it must exist, be
    writable and lie outside the checkpoint."""
    if parent is None:
        return None
    parent = Path(parent).expanduser().resolve()
    source = model_path.resolve()
    if parent == source or source in parent.parents:
        raise RepskipError(f"the offload folder {parent} lies inside the checkpoint {source}; choose a folder "
                           "outside it (repskip writes nothing into a model it reads)")
    if not parent.is_dir():
        raise RepskipError(f"the offload folder {parent} does not exist; create it or choose another")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RepskipError(f"the offload folder {parent} is not writable; choose another with --offload-folder")
    return parent


@contextlib.contextmanager
def offload_folder(parent: str | os.PathLike | None, model_path: Path) -> Iterator[Path]:
    """A fresh folder for the tensors transformers converts on load, removed afterwards:
    inside ``parent`` (see check_folder) if given, else in the system's temporary folder.
    Folders that a killed run left there are removed first; nothing else in it is touched."""
    parent = check_folder(parent, model_path)
    base = parent or Path(tempfile.gettempdir())
    for stale in base.glob("repskip-offload-*-*"):  # left by a run that was killed
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"repskip-offload-{os.getpid()}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def spread_folder(device_map: str | None, max_memory: int | None, parent: str | os.PathLike | None,
                  model_path: Path) -> Iterator[Path | None]:
    """For inference on a model spread by accelerate (``device_map``, e.g. "auto"): the fresh
    folder where what does not fit in ``max_memory`` waits (see offload_folder), removed
    afterwards; None without a device map. ``max_memory`` or a folder without a device map is
    refused in one line."""
    if device_map is None:
        if max_memory is not None or parent is not None:
            raise RepskipError("--max-memory and --offload-folder place a model spread by --device-map; add "
                               "--device-map auto")
        yield None
        return
    with offload_folder(parent, model_path) as folder:
        yield folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plan(handle: Any, mode: str, dtype: Any, device: str, tokens: int, max_memory: int | None = None,
         folder: str | os.PathLike | None = None) -> str:
    """"whole" or "sequential" for running ``handle`` as ``mode`` asks (see ``choose``), from
    its estimated need and the memory free on ``device`` (or ``max_memory``), or a one-line
    refusal; the offload folder is checked too. Nothing is loaded."""
    check_folder(folder, handle.path)
    free = max_memory if max_memory is not None else available(device)
    return choose(mode, estimate(handle, dtype, tokens), free, f"{handle.path.name} ({handle.family_name})",
                  budget=max_memory is not None)


@contextlib.contextmanager
def loaded(handle: Any, dtype: Any, device: str, *, mode: str = "auto", plan: str | None = None, tokens: int = 0,
           max_memory: int | None = None, folder: str | os.PathLike | None = None,
           say: Any = None) -> Iterator[Any]:
    """``handle``'s model, whole on ``device`` or with its layers left on disk, as ``mode`` and
    the estimate decide (see the module's docstring), or as ``plan`` ("whole", "sequential":
    what ``choose`` said earlier); ``model.repskip_layerwise`` says which. ``dtype``: a torch
    dtype or None (as stored); ``tokens``: the calibration tokens it will run."""
    what = f"{handle.path.name} ({handle.family_name})"
    check_folder(folder, handle.path)
    need = estimate(handle, dtype, tokens)
    free = max_memory if max_memory is not None else available(device)
    plan = plan or choose(mode, need, free, what, budget=max_memory is not None)
    if plan == "whole":
        model = handle.family.load(handle.path, dtype, device)
        model.repskip_layerwise = False
        yield model
        return
    device_map = getattr(handle.family, "layerwise_device_map", None)
    if device_map is None:
        raise RepskipError(f"{what} does not load one layer at a time ({handle.family_name} models load onto one "
                           f"device); run it with --offload none on a machine where it fits")
    with offload_folder(folder, handle.path) as scratch:
        if say:
            say(f"loading {handle.path.name} one layer at a time from disk (whole, it needs about "
                f"{_gb(need.whole)}; {_gb(free)} {'allowed' if max_memory is not None else 'available'})")
        model = handle.family.load(handle.path, dtype, device, device_map=device_map(handle.ckpt.config, device),
                                   offload_folder=scratch)
        model.repskip_layerwise = True
        # the calibration states get what the layers leave; beyond it they wait in the scratch folder
        spare = free - need.sequential
        model.repskip_state_budget = (spare, scratch)
        if say and need.states > spare:
            say(f"the calibration states (about {_gb(need.states)}) outgrow the {_gb(spare)} left beside the "
                "layers: the rest wait on disk")
        try:
            yield model
        finally:
            del model
