"""The linear repair fitted in two sweeps of the model, one decoder layer at a time.

The fit of repskip.repair.fit.fit_linear (the same runs in the same order, the same sums, the
same ridge steps and KL check), run through repskip.engine.layerwise so that each layer runs
once over every calibration pass for the full model and once for the pruned one, instead of
streaming the calibration text twice per removed run:

1. The full sweep runs every layer over every pass (past the last run, only the passes the KL
   check reads) and keeps each run's target (the state after its last layer), the check
   passes' final states, and every pass's state in front of the first run's anchor.
2. The pruned sweep starts there (in front of it the pruned model is the full one), skips the
   removed layers and ends at the last anchor. At a run's anchor the layer runs once with its
   MLP output recorded; the run's sums are then complete, so its map is solved and checked
   there (each trial runs the rest of the pruned model on the check passes alone; a run's
   "no map" trial is the previous run's kept trial, already measured) and the anchor runs
   again with the map kept before any layer after it runs.

The states of every pass stay in memory between layers, in the model's dtype.

``fit_linear_many`` fits several removals on the same text (``--strategy auto``'s
candidates) with one full sweep for all of them, then one pruned sweep each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..analyze.objective import Objective, Pass
from ..analyze.surgery import Surgery
from ..engine import layerwise
from ..engine.states import States, store_for
from ..engine.layerwise import onloaded
from ..runtime import model_device
from .fit import CHECK_BATCHES, Batches, FitResult, check_sum, choose_map, scored_states, torch_maps
from .cosine import fitter
from .linear import removed_runs, token_weights


class _Passes:
    """Every forward pass of the calibration batches, with the arguments each layer gets."""

    def __init__(self, model: Any, family: Any, batches: Batches, objective: Objective):
        self.passes: list[Pass] = []
        self.checked: list[bool] = []  # read by the KL check (the first CHECK_BATCHES batches)
        self.inputs: list[layerwise.LayerInputs] = []
        self.store = store_for(model)
        self.first = self.store.series()  # each pass's state entering the first layer
        shape = layerwise.LayerShape()
        for index, (ids, mask) in enumerate(batches()):
            for p in objective.passes(ids, mask, index):
                self.passes.append(p)
                self.checked.append(index < CHECK_BATCHES)
                x = layerwise.record(model, family, lambda p=p: objective.logits(model, p), shape)
                self.first.append(x.hidden)
                x.hidden = None
                self.inputs.append(x)

    def __len__(self) -> int:
        return len(self.passes)


@torch.inference_mode()
def fit_linear_layerwise(model: Any, family: Any, batches: Batches, objective: Objective, removed: Sequence[int],
                         num_layers: int, ridge: float = 1e-3,
                         progress: Callable[[int, int], None] | None = None, method: str = "linear") -> FitResult:
    """One map per maximal run of ``removed`` (original layer indices), as fit_linear fits it."""
    return fit_linear_many(model, family, batches, objective, [removed], num_layers, ridge, progress, method)[0]


@torch.inference_mode()
def fit_linear_many(model: Any, family: Any, batches: Batches, objective: Objective,
                    removals: Sequence[Sequence[int]], num_layers: int, ridge: float = 1e-3,
                    progress: Callable[[int, int], None] | None = None, method: str = "linear",
                    check: bool = True) -> list[FitResult]:
    """fit_linear_layerwise for each of ``removals`` on the same calibration text, with one
    full sweep for all: a run's target is the full model's state after its last layer, the
    same whichever removal the run belongs to. Then one pruned sweep per removal, in turn.
    Each result's ``seconds`` is its pruned sweep's time plus an equal share of the full
    sweep's. Without ``check``, each map is the fit at ``ridge`` as it is (the KL check, and the
    rest of the model it runs, left to the caller: the loss search checks only its choice)."""
    plans = [removed_runs(removed, num_layers) for removed in removals]
    start = time.perf_counter()
    like = torch.empty(0, device=model_device(model))  # where the maps go
    kl = Objective(objective.family, "kl", objective.mask_id, objective.ratios, objective.seed)
    anchors = {run.anchor for runs in plans for run in runs}
    lasts: dict[int, int] = {}  # the layer a run ends at -> how many removals' runs end there
    for runs in plans:
        for last in {run.last for run in runs}:
            lasts[last] = lasts.get(last, 0) + 1
    firsts: dict[int, int] = {}  # the first anchor of a removal -> how many removals start there
    for runs in plans:
        firsts[runs[0].anchor] = firsts.get(runs[0].anchor, 0) + 1
    end = max(runs[-1].last for runs in plans)
    full = num_layers if check else end + 1  # past the last run, only the check needs the full model
    done, total = 0, full + sum(runs[-1].anchor + 1 - runs[0].anchor for runs in plans)

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    results: list[FitResult] = []
    with Surgery(model, family) as s, contextlib.ExitStack() as cleanup:
        data = _Passes(model, family, batches, objective)
        cleanup.callback(data.store.clear)  # what spilled to disk goes with the fit
        layers = family.decoder_layers(model)

        def run_layer(index: int, b: int, hidden: torch.Tensor, t: np.ndarray | None = None) -> torch.Tensor:
            """Layer ``index`` on pass ``b``'s state, its MLP output times ``t`` if given."""
            s.maps = torch_maps({index: t}, like) if t is not None else {}  # the other settings stay
            args, kwargs = data.inputs[b].call(index, hidden)
            return family.layer_output(layers[index](*args, **kwargs))

        def logits(b: int, final: torch.Tensor) -> torch.Tensor:
            # the model's own final norm and head on a last state: every layer stands aside
            s.set(skip=range(num_layers - 1), replay={num_layers - 1: final})
            out = kl.logits(model, data.passes[b])
            s.set()
            return out

        # 1. the full model: every run's target, each removal's entry state, the check passes' final states
        targets: dict[int, States] = {}
        entries: dict[int, States] = {}
        checked = [b for b in range(len(data)) if data.checked[b]]
        hidden = data.first
        for index in range(full):
            if index in firsts:  # each removal's pruned model is the full one up to its first anchor
                entries[index] = hidden.copy()
            with onloaded(layers[index]):
                if index in anchors:  # its MLP output must join its residual stream as it is
                    s.set(record={index})
                    out = run_layer(index, 0, hidden[0])
                    m = s.mlp.get(index)
                    s.set(record={index}, zero={index})
                    check_sum(index, out, m, run_layer(index, 0, hidden[0]))
                    s.set()
                # past the last run only the check's passes go on, for their final states
                for b in range(len(data)) if index <= end else checked:
                    hidden[b] = run_layer(index, b, hidden[b])
            if index in lasts:
                targets[index] = data.store.series(
                    None, (h[p.states.to(h.device)] for h, p in zip(hidden, data.passes)))
            tick()
        references = {b: kl.reference(logits(b, hidden[b]), data.passes[b]) for b in checked} if check else {}
        scored = sum(int(data.passes[b].states.sum() if kl.diffusion else data.passes[b].scored.sum())
                     for b in checked)
        hidden.release()
        shared = (time.perf_counter() - start) / len(plans)

        # 2. each removal's pruned model, each map fitted, checked and applied at its anchor
        for removed, runs in zip(removals, plans):
            began = time.perf_counter()
            first = runs[0].anchor
            firsts[first] -= 1
            hidden = entries.pop(first) if firsts[first] == 0 else entries[first].copy()
            results.append(_pruned_sweep(removed, runs, hidden, targets, lasts, data, checked, references, scored,
                                         run_layer, logits, kl if check else None, layers, num_layers, ridge, s,
                                         tick, method))
            results[-1].seconds = shared + time.perf_counter() - began
    return results


def _pruned_sweep(removed, runs, hidden, targets, lasts, data, checked, references, scored, run_layer, logits,
                  check, layers, num_layers, ridge, s, tick, method) -> FitResult:
    """Step 2 of the fit for one removal: from its first anchor to its last, the pruned model
    (its removed layers skipped, the maps kept so far applied), fitting each run's map at its
    anchor against the full model's ``targets`` (released once no other removal needs them);
    ``check`` (the KL objective) checks each map, None keeps each fit as it is."""
    skipped = set(removed)
    anchors = {run.anchor: run for run in runs}

    def divergences(index: int, entering: States, outputs: States,
                    trials: dict[str, np.ndarray | None]) -> dict[str, float]:
        """Each trial's KL to the full model on the check passes: the anchor ``index`` with
        the trial's map (None: ``outputs``, its output without one), then the rest of the
        pruned model, one layer at a time over every trial and pass."""
        states = {}
        with onloaded(layers[index]):
            for name, t in trials.items():
                states[name] = {b: outputs[b] if t is None else run_layer(index, b, entering[b], t) for b in checked}
        for later in range(index + 1, num_layers):
            if later not in skipped:
                with onloaded(layers[later]):
                    for h in states.values():
                        for b in checked:
                            h[b] = run_layer(later, b, h[b])
        totals = dict.fromkeys(trials, 0.0)
        for name, h in states.items():
            for b in checked:
                totals[name] += check.loss(logits(b, h[b]), data.passes[b], references[b])[0]
        return {name: total / max(scored, 1) for name, total in totals.items()}

    maps: dict[int, np.ndarray] = {}
    residual: dict[int, float] = {}
    details: list[dict] = []
    dropped = []
    tokens = 0
    settled: float | None = None  # the KL of the pruned model as repaired so far, once measured
    for index in range(runs[0].anchor, runs[-1].anchor + 1):  # nothing after the last anchor is needed
        run = anchors.get(index)
        if index in skipped:
            pass
        elif run is None:
            with onloaded(layers[index]):
                for b in range(len(hidden)):
                    hidden[b] = run_layer(index, b, hidden[b])
        else:
            ls = fitter(method, hidden[0].shape[-1])
            outputs = data.store.series()
            with onloaded(layers[index]):
                for b, p in enumerate(data.passes):
                    s.set(record={index})
                    out = run_layer(index, b, hidden[b])
                    m = s.mlp[index]
                    y = targets[run.last][b].double().cpu().numpy()
                    ls.add(scored_states(p, m), y - scored_states(p, out - m), token_weights(y))
                    outputs.append(out)
                s.set()
            lasts[run.last] -= 1
            if lasts[run.last] == 0:
                targets.pop(run.last).release()
            tokens = ls.tokens

            def measured(trials: dict[str, np.ndarray | None], index: int = index, entering: States = hidden,
                         outputs: States = outputs) -> dict[str, float]:
                # the model the previous run's check kept is this run's model without a map:
                # its "none" trial was measured there
                known = {name: settled for name, t in trials.items() if t is None and settled is not None}
                rest = {name: t for name, t in trials.items() if name not in known}
                return {**known, **(divergences(index, entering, outputs, rest) if rest else {})}

            if check is None:  # the fit as it is; the caller checks what it chooses
                name, chosen, losses = "ridge x1", ls.solve(ridge).astype(np.float32).astype(np.float64), {}
            else:
                name, chosen, losses = choose_map(ls, ridge, measured)
            settled = losses.get(name)
            detail = {"anchor": run.anchor, "run": [run.first, run.last], "tokens": ls.tokens,
                      "check_loss": {k: round(v, 6) for k, v in losses.items()}}
            if chosen is None:
                dropped.append(run)
                detail["kept"] = False
                hidden.release()
                hidden = outputs
            else:
                maps[index] = chosen
                residual[index] = ls.residual(chosen)
                detail.update(residual=round(residual[index], 6), kept=True)
                with onloaded(layers[index]):
                    for b in range(len(hidden)):
                        hidden[b] = run_layer(index, b, hidden[b], chosen)
                outputs.release()
            details.append(detail)
        tick()
    hidden.release()
    return FitResult(maps, runs, residual, tokens, 0.0, ridge, details, dropped, method)
