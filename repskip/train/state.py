"""A heal's resumable state in one safetensors file (no pickle): the trainable weights, the
optimiser's moments, the global RNG state, and a JSON record (step, history, the settings
that must match for a resume) in the file's metadata.

The file is written beside and renamed into place, so a run killed at any moment leaves the
previous state whole; a resumed run continues from its step exactly: the data order, the
masks and the learning rate are functions of the step and the seed, not of what ran before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import RepskipError
from ..outputs import write_atomic
from .shard import full, like

STATE_FILE = "state.safetensors"
STATE_SCHEMA = 1


def save(folder: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, record: dict,
         write: bool = True) -> None:
    """Save the state; ``write`` False in the processes of a launch other than the main one.
    Every process calls this: the state of a sharded model is whole tensors, gathered."""
    from safetensors.torch import save as save_bytes

    tensors: dict[str, torch.Tensor] = {}
    names = trainable_names(model)
    for name, param in names.items():
        tensors[f"param/{name}"] = full(param).contiguous()
    for i, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        state = optimizer.state.get(param, {})
        for key in sorted(state):  # the same order in every process: gathering is collective
            if torch.is_tensor(state[key]):
                tensors[f"optim/{i}/{key}"] = full(state[key]).contiguous().clone()
    if not write:
        return
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"repskip": json.dumps({"schema_version": STATE_SCHEMA, "step": step, **record})}
    write_atomic(folder / STATE_FILE, save_bytes(tensors, metadata=meta))


def trainable_names(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def peek(folder: Path) -> dict | None:
    """The record of the state in ``folder``, or None when there is none."""
    from safetensors import safe_open

    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})["repskip"])
    except Exception:  # noqa: BLE001 - a state we cannot read is not resumed from
        raise RepskipError(f"{path} is not a readable heal state; pass --no-resume to start afresh") from None
    if record.get("schema_version") != STATE_SCHEMA:
        raise RepskipError(f"{path} is a heal state of another repskip version; pass --no-resume to start afresh")
    return record


def restore(folder: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Put the saved weights, optimiser moments and RNG state back (after ``peek``); each
    process of a sharded run takes its own share of them."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATE_FILE))
    params = trainable_names(model)
    saved = {k[len("param/"):] for k in tensors if k.startswith("param/")}
    if saved != set(params):
        raise RepskipError(f"{folder / STATE_FILE} trains other parameters than this run; pass --no-resume")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(like(param, tensors[f"param/{name}"]))
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, i, field = key.split("/", 2)
            param = ordered[int(i)]  # a moment has its parameter's shape and layout; a step count is a scalar
            state["state"].setdefault(int(i), {})[field] = like(param, value) if value.shape == param.shape \
                else value.to(param.device)
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng/torch"])
