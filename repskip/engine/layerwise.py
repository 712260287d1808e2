"""Run a decoder one layer at a time over every calibration batch.

The model's own forward decides what each decoder layer receives (position embeddings, the
causal or sliding-window mask of that layer's kind, cache positions, a linear-attention mask):
for each batch, every layer is swapped for a recorder that keeps the arguments it is handed and
passes the hidden states through unchanged, so one cheap forward pass (embeddings only) yields
all of them. The real layers then run one after another, each over all batches, on those
arguments: the same arithmetic as the whole model's forward, so the results match it bit for
bit, while only one layer needs to be in memory (``layer_at`` may load each from disk and the
caller may drop it after use).

Not for layers whose arguments depend on an earlier layer's output (Gemma 3n's per-layer
inputs, hyper-connection streams): the recorded arguments would be those of the pass-through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


class _Done(Exception):
    """Raised by the last recorder: nothing after the decoder layers needs to run."""


class _Recorder(torch.nn.Module):
    """Stands in for one decoder layer during a recording pass."""

    def __init__(self, layer: torch.nn.Module, record: list, last: bool):
        super().__init__()
        # the model's forward reads plain settings off its layers (attention_type, say)
        for name, value in vars(layer).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)
        self._record, self._last = record, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._record.append((args, kwargs))
        if self._last:
            raise _Done
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class LayerInputs:
    """One batch's first hidden state and the arguments each layer is handed besides it."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]

    def call(self, index: int, hidden: torch.Tensor) -> tuple[tuple, dict]:
        args, kwargs = self.calls[index]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def record(model: Any, family: Any, forward: Callable[[], Any]) -> LayerInputs:
    """Run ``forward()`` (a forward pass of ``model``) with its decoder layers swapped for
    recorders; the layers are back in place on return."""
    layers = family.decoder_layers(model)
    real = list(layers)
    calls: list[tuple[tuple, dict]] = []
    try:
        for i, layer in enumerate(real):
            layers[i] = _Recorder(layer, calls, last=i == len(real) - 1)
        try:
            forward()
        except _Done:
            pass
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    if len(calls) != len(real):
        raise RuntimeError(f"the forward pass called {len(calls)} of the {len(real)} decoder layers")
    args, kwargs = calls[0]
    return LayerInputs(args[0] if args else kwargs["hidden_states"], calls)


@contextlib.contextmanager
def onloaded(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s weights on its execution device once for every call inside, where
    accelerate has offloaded them (to the CPU or disk): its hooks would otherwise load and drop
    them at every call, once per batch. A module in memory is left as it is."""
    from accelerate.utils import has_offloaded_params

    hooked = [m for m in module.modules() if has_offloaded_params(m)]
    loaded = []
    try:
        for m in hooked:
            m._hf_hook.pre_forward(m)  # loads the weights
            loaded.append(m)
            m._hf_hook.offload = False  # and the calls inside leave them
        yield
    finally:
        for m in loaded:
            m._hf_hook.offload = True
            m._hf_hook.post_forward(m, None)  # drops them again


def run(
    model: Any,
    family: Any,
    batches: Sequence[Callable[[], Any]],
    on_layer: Callable[[int, int, torch.Tensor, torch.Tensor], None],
    layer_at: Callable[[int], torch.nn.Module] | None = None,
) -> list[torch.Tensor]:
    """Each batch's forward (``batches[b]()``) is recorded, then layer by layer, batch by batch:
    ``on_layer(index, batch, h_in, h_out)``. ``layer_at(index)`` gives the layer to run (default:
    the model's own). Returns each batch's last hidden state."""
    inputs = [record(model, family, forward) for forward in batches]
    hidden = [x.hidden for x in inputs]
    count = len(family.decoder_layers(model))
    for index in range(count):
        layer = layer_at(index) if layer_at is not None else family.decoder_layers(model)[index]
        with onloaded(layer):
            for b, x in enumerate(inputs):
                args, kwargs = x.call(index, hidden[b])
                out = family.layer_output(layer(*args, **kwargs))
                on_layer(index, b, hidden[b], out)
                hidden[b] = out
    return hidden
