"""Fitting the linear repair of every removed run on calibration text.

Runs are fitted in order, each on the model with the layers removed and the runs in front of
it already repaired, against the full model's hidden state after the run: a map then also
corrects what the repairs before it left over, not only its own run. Each fit streams the
calibration batches twice per run (the full model up to the run's end, the pruned one up to
its anchor) and keeps only the float64 sums of repskip.repair.linear.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..analyze.objective import Objective
from ..analyze.surgery import Surgery
from ..errors import RepskipError
from .linear import LeastSquares, Run, removed_runs, token_weights

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class FitResult:
    maps: dict[int, np.ndarray]  # anchor layer -> T, float64
    runs: list[Run]
    residual: dict[int, float]  # anchor -> |MT - D|^2 / |M - D|^2 on the calibration tokens
    tokens: int
    seconds: float
    ridge: float
    details: list[dict] = field(default_factory=list)


def check_supported(family: Any, config: dict) -> None:
    """Refuse repair for a family that names no MLP output projection."""
    if family.mlp_output_tensor(config, 0) is None:
        raise RepskipError(
            f"the {type(family).__name__} family plugin declares no MLP output projection, so it cannot take a "
            "linear repair; drop --repair (or give the plugin mlp_output_projection and mlp_output_tensor)"
        )


def torch_maps(maps: dict[int, np.ndarray], like: torch.Tensor) -> dict[int, torch.Tensor]:
    """The maps as float32 tensors on the model's device, for Surgery."""
    return {a: torch.as_tensor(t, dtype=torch.float32, device=like.device) for a, t in maps.items()}


def _states(p: Any, hidden: torch.Tensor) -> np.ndarray:
    return hidden[p.states.to(hidden.device)].double().cpu().numpy()


@torch.inference_mode()
def fit_linear(model: Any, family: Any, batches: Batches, objective: Objective, removed: Sequence[int],
               num_layers: int, ridge: float = 1e-3,
               progress: Callable[[int, int], None] | None = None) -> FitResult:
    """Fit one map per maximal run of ``removed`` (original layer indices), in order."""
    runs = removed_runs(removed, num_layers)
    start = time.perf_counter()
    like = next(model.parameters())
    maps: dict[int, np.ndarray] = {}
    residual: dict[int, float] = {}
    details = []
    tokens = 0
    with Surgery(model, family) as s:
        for done, run in enumerate(runs):
            ls: LeastSquares | None = None
            for index, (ids, mask) in enumerate(batches()):
                for p in objective.passes(ids, mask, index):
                    s.set(record={run.last}, stop_after=run.last)  # the full model, up to the run's end
                    s.run(objective.logits, model, p)
                    target = s.outputs[run.last]
                    s.set(skip=removed, maps=torch_maps(maps, like), record={run.anchor}, stop_after=run.anchor)
                    s.run(objective.logits, model, p)
                    m = s.mlp[run.anchor]
                    rest = s.outputs[run.anchor] - m  # the residual stream the MLP output joins
                    if ls is None:
                        ls = LeastSquares(m.shape[-1])
                    y = _states(p, target)
                    ls.add(_states(p, m), y - _states(p, rest), token_weights(y))
            assert ls is not None
            # float32, as stored in the maps file: every use of a fit folds the same numbers
            maps[run.anchor] = ls.solve(ridge).astype(np.float32).astype(np.float64)
            residual[run.anchor] = ls.residual(maps[run.anchor])
            tokens = ls.tokens
            details.append({"anchor": run.anchor, "run": [run.first, run.last], "tokens": ls.tokens,
                            "residual": round(residual[run.anchor], 6)})
            if progress:
                progress(done + 1, len(runs))
    return FitResult(maps, runs, residual, tokens, time.perf_counter() - start, ridge, details)


def calibration_batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> Batches:
    """The calibration batches, as often as a fit or search needs them (right-padded)."""
    from ..analyze.calibration import batches

    def make() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(sequences, batch_size, pad_id)

    return make


def fold_in_memory(model: Any, family: Any, maps: dict[int, np.ndarray]) -> None:
    """Fold each map into its anchor layer's MLP output projection of a loaded model (before
    any layer is removed: anchors are original indices)."""
    layers = family.decoder_layers(model)
    with torch.no_grad():
        for anchor, t in maps.items():
            projection = family.mlp_output_projection(layers[anchor])
            tt = torch.as_tensor(t, dtype=torch.float64, device=projection.weight.device).T
            for param in (projection.weight, projection.bias):
                if param is not None:
                    folded = (tt @ param.double().reshape(tt.shape[1], -1)).reshape(param.shape)
                    # rounded as fold_bytes rounds: float64 kept, else through float32
                    param.copy_(folded if param.dtype == torch.float64 else folded.to(torch.float32).to(param.dtype))
