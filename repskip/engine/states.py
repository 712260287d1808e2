"""Calibration states kept between layers, in memory up to a budget and on disk beyond it.

A model run one decoder layer at a time keeps every calibration batch's hidden state from one
layer to the next (and the repair's sweeps a few more copies). For a large model over much
text these outgrow the memory the layers leave free, so past ``budget`` bytes a state is
written to a safetensors file and read back when its layer comes: in a fresh folder of the
store's own inside ``folder`` (the run's scratch folder), removed once empty, so no other file
is ever touched. The numbers are the same either way. Without a budget everything stays in
memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


def store_for(model: object) -> StateStore:
    """A store with the state budget the model was loaded with (repskip.engine.offload sets it
    on a model it streams from disk); unbounded otherwise."""
    budget, folder = getattr(model, "repskip_state_budget", (None, None))
    return StateStore(budget, folder)


class StateStore:
    """Tensors by key, in memory while they fit ``budget`` bytes, else spilled to ``folder``."""

    def __init__(self, budget: int | None = None, folder: Path | None = None):
        if budget is not None and folder is None:
            raise ValueError("a state budget needs a folder to spill to")
        self.budget, self.folder = budget, folder
        self._memory: dict[str, torch.Tensor] = {}
        self._disk: dict[str, tuple[torch.device, Path]] = {}
        self.in_memory = 0  # bytes
        self.spilled = 0  # states written to disk, over the run
        self._series = 0
        self._made: Path | None = None  # where spilled states go, made at the first spill

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:
        self.pop(key)
        size = tensor.numel() * tensor.element_size()
        if self.budget is None or self.in_memory + size <= self.budget:
            self._memory[key] = tensor
            self.in_memory += size
            return
        from safetensors.torch import save_file

        path = self._own_folder() / f"state-{self.spilled}.safetensors"
        save_file({"state": tensor.detach().contiguous().cpu()}, str(path))
        self._disk[key] = (tensor.device, path)
        self.spilled += 1

    def _own_folder(self) -> Path:
        """A fresh folder of this store's inside ``folder``: its files never meet another's."""
        if self._made is None:
            import tempfile

            assert self.folder is not None
            self._made = Path(tempfile.mkdtemp(prefix="repskip-states-", dir=self.folder))
        return self._made

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        from safetensors.torch import load_file

        device, path = self._disk[key]
        return load_file(str(path))["state"].to(device)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._disk

    def pop(self, key: str) -> None:
        """Forget ``key`` (its file too)."""
        tensor = self._memory.pop(key, None)
        if tensor is not None:
            self.in_memory -= tensor.numel() * tensor.element_size()
        spilled = self._disk.pop(key, None)
        if spilled is not None:
            spilled[1].unlink(missing_ok=True)
            if not self._disk and self._made is not None:  # ours and now empty: rmdir removes nothing else
                self._made.rmdir()
                self._made = None

    def clear(self) -> None:
        for key in [*self._memory, *self._disk]:
            self.pop(key)

    def series(self, name: str | None = None, tensors: Iterable[torch.Tensor] = ()) -> States:
        """A list-like view of the states ``name``[0], ``name``[1], ..., filled from ``tensors``
        (without a name, one no other series of this store has)."""
        self._series += 1
        view = States(self, name if name is not None else f"#{self._series}")
        for tensor in tensors:
            view.append(tensor)
        return view


class States:
    """One series of states (one per calibration pass) in a StateStore, used as a list."""

    def __init__(self, store: StateStore, name: str):
        self.store, self.name, self.count = store, name, 0

    def _key(self, index: int) -> str:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return f"{self.name}/{index}"

    def append(self, tensor: torch.Tensor) -> None:
        self.count += 1
        self.store[self._key(self.count - 1)] = tensor

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.store[self._key(index)]

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        self.store[self._key(index)] = tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self.count))

    def copy(self) -> States:
        """The same states as another series (a state in memory is shared, not copied: the
        series replace their tensors, never change them in place)."""
        return self.store.series(None, iter(self))

    def release(self) -> None:
        for i in range(self.count):
            self.store.pop(self._key(i))
        self.count = 0
