"""A heal sharded over the processes of a launch, with torch's FSDP2 (``fully_shard``), for a
model that fits no single device.

Each decoder layer, then the model around them, is one FSDP unit: a process keeps a
1/N share of every parameter, gradient and optimiser moment on its device, and gathers a
unit's full weights only while that unit runs. The teacher is sharded the same way (it only
runs forward). The training is the data-parallel one, step for step: each process takes its
own share of the batch and the gradients are averaged (reduce-scatter instead of all-reduce).

What crosses the process boundary in full goes through :func:`full`, a collective every
process must call in the same order: the resumable state (repskip.train.state) and the
trained weights at the end, which the main process puts back into an unsharded copy of the
model for the LoRA merge and the write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def mesh(device_type: str, world: int) -> Any:
    """A one-dimensional device mesh over the launch's processes (the process group the
    launcher set up: gloo on CPU, NCCL on GPUs)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def shard(family: Any, model: Any, device_mesh: Any) -> Any:
    """Shard ``model`` in place over ``device_mesh``: each decoder layer its own unit, the
    rest (embeddings, final norm, head) the root's. The shards move to the mesh's device."""
    from torch.distributed.fsdp import fully_shard

    for layer in family.decoder_layers(model):
        fully_shard(layer, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def held(model: Any) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model)."""
    mine = sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())
    return mine, sum(p.numel() for p in model.parameters())


def shard_from_main(family: Any, model: Any, device_mesh: Any, device: Any, main: bool) -> Any:
    """Shard ``model``, the loaded model in the main process and its ``family.empty`` twin on
    the meta device in the others: the main process's weights and buffers go out in shares,
    so only it ever holds the whole model in memory (a collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = model.state_dict() if main else {}
    shard(family, model, device_mesh)
    if not main:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    buffers = [b for _, b in sorted(model.named_buffers())]  # not in the state dict: rotary tables and the like
    sizes = torch.tensor([b.numel() * b.element_size() for b in buffers] or [0], device=device)
    expected = sizes.clone()
    dist.broadcast(expected, 0)
    if not torch.equal(sizes, expected):
        from ..errors import RepskipError

        raise RepskipError("the model built without weights has other buffers than the loaded one; "
                           "please report this (a sharded heal of this family needs every process to load it)")
    for b in buffers:
        dist.broadcast(b, 0)
    return model


def builds_empty(family: Any) -> bool:
    """Whether ``family`` builds a model without weights (``Family.empty``): the same answer in
    every process, so every process takes the same path."""
    from ..family import Family

    return type(family).empty is not Family.empty


def empty_like_loaded(family: Any, config: dict, dtype: torch.dtype) -> Any | None:
    """``family.empty(config)`` with its parameters in ``dtype`` (buffers as the family builds
    them, as loading leaves them), or None where the family cannot build one."""
    model = family.empty(config)
    if model is None:
        return None
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def is_sharded(value: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor, on the CPU: gathered from every process for a sharded one (a
    collective: every process calls it, in the same order), as it is otherwise."""
    if is_sharded(value):
        value = value.full_tensor()
    return value.detach().cpu()


def like(template: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every process holds) laid out as ``template``: this process's
    share of it for a sharded template (no communication), moved to its device otherwise."""
    if is_sharded(template):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(template.device), template.device_mesh, template.placements,
                                 src_data_rank=None)
    return value.to(template.device)


@contextlib.contextmanager
def gradient_sync(model: Any, sync: bool, fallback: Any) -> Iterator[None]:
    """Gradients reduced across processes only when ``sync`` (the last micro-batch of a
    step). ``fallback`` is the data-parallel way (accelerate's ``no_sync``) for an unsharded
    model."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
        yield
    elif sync:
        yield
    else:
        with fallback(model):
            yield
