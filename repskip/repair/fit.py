"""Fitting the linear repair of every removed run on calibration text.

Runs are fitted in order, each on the model with the layers removed and the runs in front of
it already repaired, against the full model's hidden state after the run: a map then also
corrects what the repairs before it left over, not only its own run. A map is kept only if it
brings the predictions closer to the full model's (see CHECK_BATCHES); else a stronger ridge is
tried, else the run stays unrepaired and the result says so. Each fit streams the
calibration batches twice per run (the full model up to the run's end, the pruned one up to
its anchor) and keeps only the float64 sums of repskip.repair.linear.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..analyze.objective import Objective
from ..analyze.surgery import Surgery
from ..errors import RepskipError
from ..runtime import model_device
from .cosine import CosineFit, fitter
from .linear import LeastSquares, Run, removed_runs, token_weights

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


# Each fitted map must bring the model's predictions closer to the full model's (KL on the
# first CHECK_BATCHES calibration batches), or a stronger ridge is tried (x RIDGE_STEPS), or
# the run is left unrepaired. The fit lowers the error of the hidden state, not of the
# predictions, and the two can part: on SmolLM2-135M a map for a block of 8 layers cut the
# weighted state error yet took perplexity from 580 to 42,000.
CHECK_BATCHES = 2
RIDGE_STEPS = (1.0, 10.0, 100.0)


@dataclass
class FitResult:
    maps: dict[int, np.ndarray]  # anchor layer -> T, float64 (runs whose map was dropped: absent)
    runs: list[Run]
    residual: dict[int, float]  # anchor -> |MT - D|^2 / |M - D|^2 on the calibration tokens
    tokens: int
    seconds: float
    ridge: float
    details: list[dict] = field(default_factory=list)
    dropped: list[Run] = field(default_factory=list)  # runs left unrepaired: no map lowered the loss
    method: str = "linear"  # how the maps were fitted: linear (least squares) or cosine


def check_supported(family: Any, config: dict) -> None:
    """Refuse repair for a model whose MLP output no map folds into exactly."""
    problem = family.repair_problem(config)
    if problem:
        raise RepskipError(f"cannot repair this {config.get('model_type') or 'model'} with a linear map: {problem}; "
                           "drop --repair (use --repair none)")


def torch_maps(maps: dict[int, np.ndarray], like: torch.Tensor) -> dict[int, torch.Tensor]:
    """The maps as float32 tensors on the model's device, for Surgery."""
    return {a: torch.as_tensor(t, dtype=torch.float32, device=like.device) for a, t in maps.items()}


def scored_states(p: Any, hidden: torch.Tensor) -> np.ndarray:
    """The hidden states of a pass's real tokens [tokens, hidden], float64, for the sums."""
    return hidden[p.states.to(hidden.device)].double().cpu().numpy()



@torch.inference_mode()
def fit_linear(model: Any, family: Any, batches: Batches, objective: Objective, removed: Sequence[int],
               num_layers: int, ridge: float = 1e-3,
               progress: Callable[[int, int], None] | None = None, method: str = "linear") -> FitResult:
    """Fit one map per maximal run of ``removed`` (original layer indices), in order, run by
    run: memory stays flat whatever the number of calibration tokens, but the calibration text
    streams through the model twice per run. repskip.repair.sweep fits the same maps in two
    sweeps of the model (what analyze runs), keeping the states between layers."""
    runs = removed_runs(removed, num_layers)
    start = time.perf_counter()
    like = torch.empty(0, device=model_device(model))  # where the maps go
    maps: dict[int, np.ndarray] = {}
    residual: dict[int, float] = {}
    details: list[dict] = []
    dropped: list[Run] = []
    tokens = 0
    with Surgery(model, family) as s:
        check_joins_residual(s, model, batches, objective, [run.anchor for run in runs])
        for done, run in enumerate(runs):
            ls: LeastSquares | CosineFit | None = None
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
                        ls = fitter(method, m.shape[-1])
                    y = scored_states(p, target)
                    ls.add(scored_states(p, m), y - scored_states(p, rest), token_weights(y))
            assert ls is not None
            tokens = ls.tokens
            _, chosen, losses = check_map(s, model, batches, objective, removed, maps, run.anchor, ls, ridge, like)
            detail = {"anchor": run.anchor, "run": [run.first, run.last], "tokens": ls.tokens,
                      "check_loss": {k: round(v, 6) for k, v in losses.items()}}
            if chosen is None:
                dropped.append(run)
                detail["kept"] = False
            else:
                maps[run.anchor] = chosen
                residual[run.anchor] = ls.residual(chosen)
                detail.update(residual=round(residual[run.anchor], 6), kept=True)
            details.append(detail)
            if progress:
                progress(done + 1, len(runs))
    return FitResult(maps, runs, residual, tokens, time.perf_counter() - start, ridge, details, dropped, method)


def check_joins_residual(s: Surgery, model: Any, batches: Batches, objective: Objective,
                         anchors: Iterable[int]) -> None:
    """Refuse, on the first calibration batch, a layer whose MLP output m does not join its
    residual stream as it is (normed or scaled first): the fit's arithmetic (layer output =
    rest + m, and m T computed by the folded weights) would not hold for it."""
    ids, mask = next(iter(batches()))
    p = next(iter(objective.passes(ids, mask, 0)))
    for anchor in sorted(set(anchors)):
        s.set(record={anchor}, stop_after=anchor)
        s.run(objective.logits, model, p)
        out, m = s.outputs[anchor], s.mlp.get(anchor)
        s.set(record={anchor}, zero={anchor}, stop_after=anchor)
        s.run(objective.logits, model, p)
        check_sum(anchor, out, m, s.outputs[anchor])


def check_sum(anchor: int, out: torch.Tensor, m: torch.Tensor | None, rest: torch.Tensor) -> None:
    """Refuse the repair unless layer ``anchor``'s output ``out`` is the residual stream
    ``rest`` (its output with the MLP output zeroed) plus its MLP output ``m``."""
    if m is None:
        raise RepskipError(f"layer {anchor} never ran its MLP output projection; it cannot take a linear repair")
    error = float((out.float() - m.float() - rest.float()).abs().max())
    eps = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
    allowed = 8 * eps * float(out.float().abs().max()) + 1e-3 * float(m.float().abs().max())
    if error > allowed:
        raise RepskipError(
            f"cannot repair this model with a linear map: the MLP output of layer {anchor} does not join the "
            f"residual stream as it is (it is normed or scaled first: the layer's output differs from the rest "
            f"plus the MLP output by {error:.3g}), so no map folded into a weight is exact; use --repair none")


def check_map(s: Surgery, model: Any, batches: Batches, objective: Objective, removed: Sequence[int],
              maps: dict[int, np.ndarray], anchor: int, ls: LeastSquares | CosineFit, ridge: float,
              like: torch.Tensor) -> tuple[str, np.ndarray | None, dict[str, float]]:
    """The map to keep for ``anchor``: the fit at ``ridge`` if it brings the model's predictions
    closer to the full model's (KL divergence on the first CHECK_BATCHES batches, the model
    with ``removed`` skipped and ``maps`` folded) than leaving the run unrepaired, else the
    first stronger ridge that does, else None; with its trial's name ("ridge x1", ..., "none")
    and the divergence of every trial. KL to the full model, not the NLL: a repair
    should restore the model's predictions, and on a random test model the full model's NLL is
    no better than a pruned one's."""
    check = Objective(objective.family, "kl", objective.mask_id, objective.ratios, objective.seed)

    def divergences(trials: dict[str, np.ndarray | None]) -> dict[str, float]:
        tmaps = {name: torch_maps({**maps, anchor: t} if t is not None else dict(maps), like)
                 for name, t in trials.items()}
        totals, count = dict.fromkeys(trials, 0.0), 0
        for index, (ids, mask) in enumerate(itertools.islice(batches(), CHECK_BATCHES)):
            for p in check.passes(ids, mask, index):
                s.set()
                reference = check.reference(s.run(check.logits, model, p), p)
                for name in trials:
                    s.set(skip=removed, maps=tmaps[name])
                    totals[name] += check.loss(s.run(check.logits, model, p), p, reference)[0]
                count += int(p.states.sum() if check.diffusion else p.scored.sum())
        return {name: total / max(count, 1) for name, total in totals.items()}

    return choose_map(ls, ridge, divergences)


def choose_map(ls: LeastSquares | CosineFit, ridge: float, divergences: Callable[[dict[str, np.ndarray | None]], dict[str, float]]
               ) -> tuple[str, np.ndarray | None, dict[str, float]]:
    """The ridge steps' maps tried in order against no map (``divergences`` gives each trial's
    KL to the full model): the first that lowers it, else None."""
    # float32, as stored in the maps file: every use of a fit folds the same numbers
    maps_at = {f"ridge x{step:g}": ls.solve(ridge * step).astype(np.float32).astype(np.float64) for step in RIDGE_STEPS}
    first = next(iter(maps_at))
    losses = divergences({"none": None, first: maps_at[first]})  # usually the end of it
    if losses[first] >= losses["none"]:
        losses.update(divergences({name: t for name, t in maps_at.items() if name != first}))
    for name, t in maps_at.items():
        if losses[name] < losses["none"]:
            return name, t, losses
    return "none", None, losses


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
    for anchor in maps:
        if any(param.device.type == "meta" for param, _ in family.mlp_output_parameters(layers[anchor])):
            raise RepskipError(f"the repair folds into layer {anchor}, whose weights wait on disk in this run "
                               "(--device-map with --max-memory): compress the recipe and run the compressed "
                               "checkpoint, or allow the model more memory")
    with torch.no_grad():
        for anchor, t in maps.items():
            for param, axis in family.mlp_output_parameters(layers[anchor]):
                tt = torch.as_tensor(t, dtype=torch.float64, device=param.device).T
                moved = param.double().movedim(axis, 0)
                folded = (tt @ moved.reshape(tt.shape[1], -1)).reshape(moved.shape).movedim(0, axis)
                # rounded as fold_bytes rounds: float64 kept, else through float32
                param.copy_(folded if param.dtype == torch.float64 else folded.to(torch.float32).to(param.dtype))
