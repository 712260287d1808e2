"""Run a decoder one layer at a time over every calibration batch.

The model's own forward decides what each decoder layer receives (position embeddings, the
causal or sliding-window mask of that layer's kind, cache positions, a linear-attention mask):
for each batch, every layer is swapped for a recorder that keeps the arguments it is handed and
passes the hidden states through unchanged (in the form a layer returns, learned once from the
first layer), so one cheap forward pass (embeddings only) yields all of them. The real layers
then run one after another, each over all batches, on those arguments: the same arithmetic as the whole model's forward, so the results match it bit for
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

from .states import States, store_for


class _Done(Exception):
    """Raised by the last recorder: nothing after the decoder layers needs to run."""


class LayerShape:
    """What a decoder layer of this model returns (a tensor, or a tuple led by one), learned
    from the first layer's real output: the model's forward unpacks it, so the recorders must
    hand back the same kind."""

    def __init__(self) -> None:
        self.length: int | None = None  # None: unknown yet; 0: a bare tensor; n: a tuple of n

    def learn(self, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.length = 0
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            self.length = len(output)
        else:
            raise RuntimeError(f"a decoder layer returned {type(output).__name__}, not a hidden state")

    def like(self, hidden: torch.Tensor) -> Any:
        # what the layer returns besides the hidden state (attention weights, a cache) is not
        # asked for by these forwards (no cache, no attentions): None stands in for it
        return hidden if not self.length else (hidden, *([None] * (self.length - 1)))


class _Recorder(torch.nn.Module):
    """Stands in for one decoder layer during a recording pass. The first one runs its real
    layer once, to learn what a layer returns."""

    def __init__(self, layer: torch.nn.Module, record: list, last: bool, shape: LayerShape):
        super().__init__()
        # the model's forward reads plain settings off its layers (attention_type, say) and,
        # in a few models, their submodules (RWKV rescales its blocks' output weights)
        for name, value in vars(layer).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)
        for name, child in layer.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_layer", layer)
        self._record, self._last, self._shape = record, last, shape

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._record.append((args, kwargs))
        if self._last:
            raise _Done
        if self._shape.length is None:
            self._shape.learn(self._layer(*args, **kwargs))
        return self._shape.like(args[0] if args else kwargs["hidden_states"])


@dataclass
class LayerInputs:
    """One batch's first hidden state and the arguments each layer is handed besides it."""

    hidden: torch.Tensor | None  # None once handed to a StateStore
    calls: list[tuple[tuple, dict]]

    def call(self, index: int, hidden: torch.Tensor) -> tuple[tuple, dict]:
        args, kwargs = self.calls[index]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def record(model: Any, family: Any, forward: Callable[[], Any], shape: LayerShape | None = None) -> LayerInputs:
    """Run ``forward()`` (a forward pass of ``model``) with its decoder layers swapped for
    recorders; the layers are back in place on return. Pass the same ``shape`` to every
    recording of a model, so that only the first runs a real layer."""
    layers = family.decoder_layers(model)
    real = list(layers)
    calls: list[tuple[tuple, dict]] = []
    shape = shape if shape is not None else LayerShape()
    try:
        for i, layer in enumerate(real):
            layers[i] = _Recorder(layer, calls, last=i == len(real) - 1, shape=shape)
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
    first = args[0] if args else kwargs["hidden_states"]
    # the calls keep only what goes with the hidden state: each run hands its own
    calls = [((None, *a[1:]), k) if a else (a, {n: v for n, v in k.items() if n != "hidden_states"}) for a, k in calls]
    return LayerInputs(first, calls)


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
) -> States:
    """Each batch's forward (``batches[b]()``) is recorded, then layer by layer, batch by batch:
    ``on_layer(index, batch, h_in, h_out)``. ``layer_at(index)`` gives the layer to run (default:
    the model's own). The states between layers stay within the model's state budget (see
    repskip.engine.states). Returns each batch's last hidden state."""
    shape = LayerShape()
    store = store_for(model)
    hidden = store.series()
    inputs = []
    for forward in batches:
        x = record(model, family, forward, shape)
        hidden.append(x.hidden)
        x.hidden = None  # kept once, in the store
        inputs.append(x)
    count = len(family.decoder_layers(model))
    for index in range(count):
        layer = layer_at(index) if layer_at is not None else family.decoder_layers(model)[index]
        with onloaded(layer):
            for b, x in enumerate(inputs):
                h = hidden[b]
                args, kwargs = x.call(index, h)
                out = family.layer_output(layer(*args, **kwargs))
                on_layer(index, b, h, out)
                hidden[b] = out
    return hidden


@dataclass
class Program:
    """One pass of recorded arguments through a model as a trial sees it, for ``execute``:
    from ``state`` entering layer ``start`` up to ``stop`` (default: the last layer), with the
    layers in ``skip`` passed over and ``maps`` (layer -> T) on their MLP outputs."""

    batch: int  # the recorded pass whose arguments the layers get
    state: torch.Tensor | Callable[[], torch.Tensor]  # or what gives it, when its turn comes
    start: int = 0
    skip: frozenset[int] = frozenset()
    maps: dict[int, torch.Tensor] | None = None
    record: frozenset[int] = frozenset()  # layers whose output and raw MLP output go to on_record
    stop: int | None = None


def execute(
    model: Any,
    family: Any,
    surgery: Any,
    inputs: Sequence[LayerInputs],
    programs: Sequence[Program],
    on_record: Callable[[int, int, torch.Tensor, torch.Tensor | None], None] | None = None,
    store: Any = None,
) -> States:
    """Every program run one layer at a time: each layer is loaded once and runs every program
    that reaches it, so a search's trials cost one stream of the weights, not one each.
    ``surgery`` (an active repskip.analyze.surgery.Surgery on ``model``) applies the maps and
    records the MLP outputs; ``on_record(program, layer, output, mlp)`` gets what a program
    records. Returns each program's last state (in ``store``, a StateStore, if given)."""
    layers = family.decoder_layers(model)
    last = len(layers) - 1
    store = store if store is not None else store_for(model)
    states = store.series(None, (p.state() if callable(p.state) else p.state for p in programs))
    for index in range(last + 1):
        active = [i for i, p in enumerate(programs)
                  if p.start <= index <= (last if p.stop is None else p.stop) and index not in p.skip]
        if not active:
            continue
        with onloaded(layers[index]):
            for i in active:
                p = programs[i]
                t = (p.maps or {}).get(index)
                surgery.set(record={index} if index in p.record else (), maps={index: t} if t is not None else {})
                args, kwargs = inputs[p.batch].call(index, states[i])
                out = family.layer_output(layers[index](*args, **kwargs))
                if index in p.record and on_record is not None:
                    on_record(i, index, out, surgery.mlp.get(index))
                states[i] = out
    surgery.set()
    return states
