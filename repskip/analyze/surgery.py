"""Running a loaded model as if layers were removed and repaired, without changing a weight.

While a ``Surgery`` is active, the model's decoder layers obey four settings, read at every
forward call:

- ``skip``: layers that pass their input through untouched (removed);
- ``maps``: layer -> matrix T; the layer's MLP output projection returns its output times T
  (a linear repair, not yet folded);
- ``replay``: layer -> hidden state; the layer returns it at once, computing nothing, so that
  a run reuses what an earlier run of the same batch computed in front of some point;
- ``record``: layers whose output and raw MLP output (before any map) are kept in
  ``outputs`` and ``mlp``, for fits and replays;
- ``zero``: layers whose MLP output is replaced by zeros (to see what the layer adds
  without it);
- ``stop_after``: a layer after which the forward stops (``run`` returns None then), when
  nothing later is needed.

Only the layers' own forward is wrapped: embeddings, masks, positions, the final norm and
the LM head run as the model's code runs them, so this works for any family whose decoder
layers take the hidden state first and return it (alone, or first in a tuple). Forwards
must not use a KV cache (the analysis never does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class _Stop(Exception):
    """Raised after the ``stop_after`` layer: nothing past it is needed."""


def _arity(output: Any) -> int:
    return len(output) if isinstance(output, tuple) else 0


class Surgery:
    def __init__(self, model: Any, family: Any):
        self.model, self.family = model, family
        self.layers = list(family.decoder_layers(model))
        self.skip: set[int] = set()
        self.maps: dict[int, torch.Tensor] = {}
        self.replay: dict[int, torch.Tensor] = {}
        self.record: set[int] = set()
        self.zero: set[int] = set()
        self.stop_after: int | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self._tuple: dict[int, int] = {}  # layer -> length of the tuple it returns (0: a bare tensor)
        self._saved: list[tuple[Any, Any]] = []
        self._handles: list[Any] = []

    # --- settings ----------------------------------------------------------------------------
    def set(self, *, skip: Iterable[int] = (), maps: dict[int, torch.Tensor] | None = None,
            replay: dict[int, torch.Tensor] | None = None, record: Iterable[int] = (),
            stop_after: int | None = None, zero: Iterable[int] = ()) -> "Surgery":
        """Settings for the next forward calls (the recordings of earlier calls are dropped)."""
        self.skip, self.maps = set(skip), dict(maps or {})
        self.replay, self.record = dict(replay or {}), set(record)
        self.zero = set(zero)
        self.stop_after = stop_after
        self.outputs, self.mlp = {}, {}
        return self

    def run(self, forward: Any, *args: Any) -> Any:
        """``forward(*args)`` under the settings: its result, or None if it stopped early."""
        try:
            return forward(*args)
        except _Stop:
            return None

    # --- hooks ---------------------------------------------------------------------------------
    def __enter__(self) -> "Surgery":
        for index, layer in enumerate(self.layers):
            # an instance attribute (accelerate's hooks set one) is put back; else the class's
            self._saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = self._forward(index, layer.forward)
            projection = self.family.mlp_output_projection(layer)
            if projection is not None:
                self._handles.append(projection.register_forward_hook(self._projection(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for layer, forward in self._saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        self._saved, self._handles = [], []

    def _forward(self, index: int, original: Any):
        def forward(*args: Any, **kwargs: Any) -> Any:
            if index in self.replay:
                out = self._wrap(index, self.replay[index])
            elif index in self.skip:
                if index not in self._tuple:  # what the model expects back: learn it from the layer once
                    self._tuple[index] = _arity(original(*args, **kwargs))
                out = self._wrap(index, args[0] if args else kwargs["hidden_states"])
            else:
                out = original(*args, **kwargs)
                self._tuple[index] = _arity(out)
                if index in self.record:
                    self.outputs[index] = self.family.layer_output(out)
                    m = self.mlp.get(index)
                    if m is not None and m.shape != self.outputs[index].shape:  # OPT runs its MLP on [tokens, hidden]
                        self.mlp[index] = m.reshape(self.outputs[index].shape)
            if index == self.stop_after:
                raise _Stop
            return out

        return forward

    def _wrap(self, index: int, hidden: torch.Tensor) -> Any:
        if index in self.record:
            self.outputs[index] = hidden
        arity = self._tuple.get(index, 0)  # the other entries (attention weights, caches) are off here
        return (hidden, *([None] * (arity - 1))) if arity else hidden

    def _projection(self, index: int):
        def hook(module: Any, args: Any, output: Any) -> Any:
            # an MLP block may return (hidden, router logits): the map applies to the first
            main = output[0] if isinstance(output, tuple) else output
            if index in self.record:
                self.mlp[index] = main
            t = self.maps.get(index)
            if index in self.zero:
                new = torch.zeros_like(main)
            elif t is not None:
                new = (main.to(t.dtype) @ t).to(main.dtype)
            else:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook
