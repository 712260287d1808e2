"""Loss-aware selection: layers chosen by what removing them costs on the calibration loss.

- ``loss``: every layer scored alone (the model with just that layer removed); the k
  cheapest are taken, under the protection and adjacency rules.
- ``greedy-loss``: SLEB's search (Song et al., 2024): k rounds, each removing the layer whose
  removal, on top of those already removed, raises the loss least.

With ``repair``, each candidate is scored after its run's linear repair is fitted
(repskip.repair), so contiguous blocks and scattered layers compete on the loss they leave
once repaired; the maps are fitted on calibration text apart from the text that scores them.
A chosen candidate's map then goes through the check the final fit applies (it must bring the
predictions closer to the full model's, repskip.repair.fit.check_map): a candidate whose map
would be dropped, or replaced by a stronger ridge, is scored again with what it would really
get, and the choice is made again, so that no round wins on a repair the recipe will not have.
Every trial reuses, from one recorded pass of the current model, the hidden
states in front of the candidate's run: it computes only the layers after the run and the
head. On a model run one layer at a time from disk, the same trials run layer by layer
(repskip.analyze.search_streamed), each layer read once per sweep. Per round, with repair, one more sweep accumulates every candidate's least-squares sums
(two hidden x hidden float64 matrices each).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import RepskipError
from ..repair.fit import RIDGE_STEPS, Batches, check_map, scored_states as _states, torch_maps
from ..repair.linear import LeastSquares, Run, removed_runs, token_weights
from .objective import Objective
from .surgery import Surgery

STRATEGIES = ("loss", "greedy-loss")


@dataclass
class Round:
    removed: list[int]  # before the round
    losses: dict[int, float]  # candidate -> mean calibration loss with it removed (and repaired)
    chosen: list[int]
    # with repair: candidate -> the map the check kept for it ("ridge x1", "ridge x10", ..., "none")
    checked: dict[int, str] = field(default_factory=dict)


@dataclass
class SearchResult:
    strategy: str
    objective: str
    repair: bool
    base_loss: float
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        for r in data["rounds"]:
            r["losses"] = {str(k): round(v, 6) for k, v in r["losses"].items()}
            r["checked"] = {str(k): v for k, v in r["checked"].items()}
        data["base_loss"] = round(self.base_loss, 6)
        data["seconds"] = round(self.seconds, 2)
        return data


def _run_of(layer: int, removed: Sequence[int], num_layers: int) -> Run:
    return next(r for r in removed_runs([*removed, layer], num_layers) if r.first <= layer <= r.last)


class _Trials:
    """One round's trials: the current model (``removed``, ``maps``) and its candidates."""

    def __init__(self, model: Any, s: Surgery, objective: Objective, removed: list[int],
                 maps: dict[int, np.ndarray], num_layers: int, repair: bool, ridge: float):
        self.model, self.s, self.objective = model, s, objective
        self.removed, self.maps, self.L = removed, maps, num_layers
        self.repair, self.ridge = repair, ridge
        self.tmaps = torch_maps(maps, next(model.parameters()))

    def fit(self, batches: Batches, candidates: list[int]) -> dict[int, LeastSquares]:
        """Each candidate's least-squares sums, accumulated in one sweep."""
        runs = {c: _run_of(c, self.removed, self.L) for c in candidates}
        sums: dict[int, LeastSquares] = {}
        s = self.s
        for index, (ids, mask) in enumerate(batches()):
            for p in self.objective.passes(ids, mask, index):
                ends = {r.last for r in runs.values()}
                s.set(record=ends, stop_after=max(ends))
                s.run(self.objective.logits, self.model, p)
                full = dict(s.outputs)
                anchors = {r.anchor for r in runs.values()}
                s.set(skip=self.removed, maps=self.tmaps, record=anchors, stop_after=max(anchors))
                s.run(self.objective.logits, self.model, p)
                for c, run in runs.items():
                    m = s.mlp[run.anchor]
                    rest = s.outputs[run.anchor] - self._mapped(run.anchor, m)
                    y = _states(p, full[run.last])
                    sums.setdefault(c, LeastSquares(m.shape[-1])).add(_states(p, m), y - _states(p, rest), token_weights(y))
        return sums

    def check(self, batches: Batches, c: int, ls: LeastSquares) -> tuple[str, np.ndarray | None]:
        """The map the final fit's check would keep for candidate ``c`` (None: no map), in the
        model as it now is, and the name of that trial."""
        run = _run_of(c, self.removed, self.L)
        anchors = {r.anchor for r in removed_runs([*self.removed, c], self.L)}
        maps = {a: t for a, t in self.maps.items() if a in anchors and a != run.anchor}
        name, t, _ = check_map(self.s, self.model, batches, self.objective, [*self.removed, c], maps, run.anchor,
                               ls, self.ridge, next(self.model.parameters()))
        return name, t

    def _mapped(self, anchor: int, m: torch.Tensor) -> torch.Tensor:
        t = self.tmaps.get(anchor)
        return m if t is None else (m.to(t.dtype) @ t).to(m.dtype)

    def losses(self, batches: Batches, candidates: list[int], fitted: dict[int, np.ndarray],
               progress: Callable[[], None] | None = None) -> tuple[dict[int, float], float, int]:
        """Each candidate's mean loss, the current model's, and the number of tokens."""
        s, objective = self.s, self.objective
        like = next(self.model.parameters())
        totals = dict.fromkeys(candidates, 0.0)
        current, count = 0.0, 0
        runs = {c: _run_of(c, self.removed, self.L) for c in candidates}
        for index, (ids, mask) in enumerate(batches()):
            for p in objective.passes(ids, mask, index):
                reference = None
                if objective.kind == "kl":
                    s.set()
                    reference = objective.reference(s.run(objective.logits, self.model, p), p)
                s.set(skip=self.removed, maps=self.tmaps, record=range(self.L))
                logits = s.run(objective.logits, self.model, p)
                loss, n = objective.loss(logits, p, reference)
                current, count = current + loss, count + n
                outputs, mlp = dict(s.outputs), dict(s.mlp)
                for c in candidates:
                    run = runs[c]
                    replay = {j: outputs[j] for j in range(run.anchor + 1)}  # as now, in front of the run
                    if run.anchor >= 0 and c in fitted:
                        t = torch.as_tensor(fitted[c], dtype=torch.float32, device=like.device)
                        m = mlp[run.anchor]
                        replay[run.anchor] = outputs[run.anchor] - self._mapped(run.anchor, m) + (m.float() @ t).to(m.dtype)
                    later = {a: t for a, t in self.tmaps.items() if a > run.last}
                    s.set(skip=[*self.removed, c], maps=later, replay=replay)
                    totals[c] += objective.loss(s.run(objective.logits, self.model, p), p, reference)[0]
                if progress:
                    progress()
        return {c: v / count for c, v in totals.items()}, current / count, count


def _take(order: list[int], k: int, allow_adjacent: bool) -> list[int]:
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if allow_adjacent or all(abs(i - j) != 1 for j in chosen):
            chosen.append(i)
    return chosen


@torch.inference_mode()
def search(model: Any, family: Any, batches: Batches, objective: Objective, *, strategy: str, k: int,
           protected: set[int], allow_adjacent: bool = True, repair: bool = False, ridge: float = 1e-3,
           fit_batches: Batches | None = None, check_batches: Batches | None = None,
           progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Run the search and return every round's losses and choice. With ``repair``, each
    candidate's map is fitted on ``fit_batches`` (default: ``batches``) and scored on
    ``batches``: scored on text it was not fitted to, a map cannot win a round by fitting the
    scoring text. A chosen candidate's map is checked on ``check_batches`` (default:
    ``batches``): give the batches the final fit will be checked on, so that both decide on the
    same text."""
    if strategy not in STRATEGIES:
        raise RepskipError(f"unknown loss-aware strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    L = len(family.decoder_layers(model))
    start = time.perf_counter()
    removed: list[int] = []
    maps: dict[int, np.ndarray] = {}
    result = SearchResult(strategy, objective.kind, repair, base_loss=float("nan"))
    n_batches = sum(1 for _ in batches()) * (len(objective.ratios) if objective.diffusion else 1)
    rounds = k if strategy == "greedy-loss" else 1
    steps = [0]

    def tick() -> None:
        steps[0] += 1
        if progress:
            progress(steps[0], rounds * n_batches)

    streamed = bool(getattr(model, "repskip_layerwise", False))
    with Surgery(model, family) as s, contextlib.ExitStack() as cleanup:
        if streamed:  # the model runs one layer at a time from disk: the trials are ordered by layer
            from ..engine.states import store_for
            from .search_streamed import Recordings, StreamedTrials

            recordings = Recordings(model, family, store_for(model))
            cleanup.callback(recordings.store.clear)
        for _ in range(rounds):
            candidates = [c for c in range(L) if c not in removed and c not in protected
                          and (allow_adjacent or all(abs(c - j) != 1 for j in removed))
                          and not (repair and _run_of(c, removed, L).anchor < 0)]
            if not candidates:
                raise RepskipError(f"no layer is left to remove after {removed} under the protection and adjacency "
                                   f"rules, but k={k}: lower -k or protect fewer layers")
            if streamed:
                trials = StreamedTrials(model, s, objective, removed, maps, L, repair, ridge, recordings, _run_of)
            else:
                trials = _Trials(model, s, objective, removed, maps, L, repair, ridge)
            sums = trials.fit(fit_batches or batches, candidates) if repair else {}
            fitted: dict[int, np.ndarray | None] = {c: ls.solve(ridge) for c, ls in sums.items()}
            losses, current, result.tokens = trials.losses(batches, candidates, fitted, tick)
            if not removed:
                result.base_loss = current
            checked: dict[int, str] = {}
            while True:
                order = sorted(candidates, key=lambda c: (losses[c], c))
                chosen = _take(order, k, allow_adjacent) if strategy == "loss" else order[:1]
                todo = [c for c in chosen if repair and c not in checked]
                if not todo:
                    break
                for c in todo:  # what the final fit would keep; scored again if that is not this map
                    checked[c], t = trials.check(check_batches or batches, c, sums[c])
                    if checked[c] != f"ridge x{RIDGE_STEPS[0]:g}":
                        fitted[c] = t
                        no_map = np.eye(sums[c].mtm.shape[0])  # the MLP output as it is: the run unrepaired
                        losses[c] = trials.losses(batches, [c], {c: no_map if t is None else t})[0][c]
            if strategy == "loss" and len(chosen) < k:
                raise RepskipError(f"only {len(chosen)} layer(s) can be removed under the protection and adjacency "
                                   f"rules but k={k}: lower -k or protect fewer layers")
            result.rounds.append(Round(list(removed), losses, chosen, checked))
            if strategy == "greedy-loss":
                c = chosen[0]
                removed = sorted([*removed, c])
                runs = removed_runs(removed, L) if repair else []
                kept = {r.anchor: (fitted[c] if r.first <= c <= r.last else maps.get(r.anchor)) for r in runs}
                maps = {a: t for a, t in kept.items() if t is not None}
    result.seconds = time.perf_counter() - start
    return result


def chosen_layers(search_data: dict, strategy: str, k: int, protected: set[int], allow_adjacent: bool) -> list[int]:
    """The layers a recorded search chooses for k (the first k rounds of a greedy search, or
    the k cheapest layers of a one-shot one)."""
    rounds = search_data["rounds"]
    if search_data["strategy"] != strategy:
        raise RepskipError(f"the analysis searched with {search_data['strategy']}, not {strategy}: re-run "
                           f"'repskip analyze --strategy {strategy}'")
    if strategy == "greedy-loss":
        if k > len(rounds):
            raise RepskipError(f"the analysis's greedy search went {len(rounds)} round(s) deep, so it cannot choose "
                               f"k={k}: re-run 'repskip analyze --strategy greedy-loss -k {k}'")
        return sorted(r["chosen"][0] for r in rounds[:k])
    losses = {int(c): v for c, v in rounds[0]["losses"].items() if int(c) not in protected}
    chosen = _take(sorted(losses, key=lambda c: (losses[c], c)), k, allow_adjacent)
    if len(chosen) < k:
        raise RepskipError(f"only {len(chosen)} layer(s) can be removed under the protection and adjacency rules "
                           f"but k={k}: lower -k or protect fewer layers")
    return sorted(chosen)
