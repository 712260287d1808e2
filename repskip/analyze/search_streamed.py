"""The loss search's trials on a model run one decoder layer at a time from disk.

The same trials as repskip.analyze.search's in-memory ones, and the same numbers, ordered
the other way round: there each calibration pass runs every candidate through the whole model
in turn; here every candidate's pass is a program of repskip.engine.layerwise.execute, so each
layer's weights are read once per sweep and run every trial that reaches it. A round costs
one sweep for the current model's states (and, with the KL objective, the full model's), one
for the candidates (each starting from the current model's state in front of its run, as the
in-memory search replays it), and with repair one for the fits and one per map check.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..engine import layerwise
from ..engine.states import StateStore
from ..repair.fit import CHECK_BATCHES, Batches, choose_map, torch_maps
from ..repair.linear import LeastSquares, token_weights
from ..runtime import model_device
from .objective import Objective, Pass
from .surgery import Surgery


class Recordings:
    """Each calibration set's passes, recorded once for the whole search: the arguments every
    layer gets and the state entering the first."""

    def __init__(self, model: Any, family: Any, store: StateStore):
        self.model, self.family, self.store = model, family, store
        self._sets: dict[tuple, tuple[list[Pass], list[layerwise.LayerInputs], Any]] = {}
        self._shape = layerwise.LayerShape()

    def of(self, batches: Batches, objective: Objective, limit: int | None = None
           ) -> tuple[list[Pass], list[layerwise.LayerInputs], Any]:
        key = (id(batches), objective.kind, limit)
        if key not in self._sets:
            passes, inputs = [], []
            first = self.store.series()
            for index, (ids, mask) in enumerate(itertools.islice(batches(), limit)):
                for p in objective.passes(ids, mask, index):
                    x = layerwise.record(self.model, self.family, lambda p=p: objective.logits(self.model, p),
                                         self._shape)
                    first.append(x.hidden)
                    x.hidden = None
                    passes.append(p)
                    inputs.append(x)
            self._sets[key] = (passes, inputs, first)
        return self._sets[key]


class StreamedTrials:
    """One round's trials (the current model: ``removed`` skipped, ``maps`` applied) on a
    streamed model; the interface of repskip.analyze.search's in-memory trials."""

    def __init__(self, model: Any, s: Surgery, objective: Objective, removed: list[int],
                 maps: dict[int, np.ndarray], num_layers: int, repair: bool, ridge: float,
                 recordings: Recordings, run_of: Callable[[int, list[int], int], Any]):
        self.model, self.s, self.objective = model, s, objective
        self.family = objective.family
        self.removed, self.maps, self.L = removed, maps, num_layers
        self.repair, self.ridge = repair, ridge
        self.rec, self.store, self._run_of = recordings, recordings.store, run_of
        self.like = torch.empty(0, device=model_device(model))
        self.tmaps = torch_maps(maps, self.like)

    # --- helpers -------------------------------------------------------------------------------
    def _execute(self, inputs, programs, on_record=None):
        return layerwise.execute(self.model, self.family, self.s, inputs, programs, on_record, self.store)

    def _logits(self, objective: Objective, p: Pass, final: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and head on a last state: every layer stands aside."""
        self.s.set(skip=range(self.L - 1), replay={self.L - 1: final})
        out = objective.logits(self.model, p)
        self.s.set()
        return out

    def _mapped(self, anchor: int, m: torch.Tensor) -> torch.Tensor:
        t = self.tmaps.get(anchor)
        return m if t is None else (m.to(t.dtype) @ t).to(m.dtype)

    # --- the trials ----------------------------------------------------------------------------
    def fit(self, batches: Batches, candidates: list[int]) -> dict[int, LeastSquares]:
        """Each candidate's least-squares sums: the full model's state at the end of its run,
        against the current model's MLP output and the rest at its anchor."""
        passes, inputs, first = self.rec.of(batches, self.objective)
        runs = {c: self._run_of(c, self.removed, self.L) for c in candidates}
        ends, anchors = {r.last for r in runs.values()}, {r.anchor for r in runs.values()}
        kept = self.store.series()
        where: dict[tuple[str, int, int], int] = {}

        def on_record(program: int, layer: int, out: torch.Tensor, m: torch.Tensor | None) -> None:
            b, full = program // 2, program % 2 == 0
            p = passes[b]
            if full:
                where["y", b, layer] = len(kept)
                kept.append(out[p.states.to(out.device)])
            else:
                assert m is not None
                where["m", b, layer] = len(kept)
                kept.append(m[p.states.to(m.device)])
                rest = out - self._mapped(layer, m)
                where["rest", b, layer] = len(kept)
                kept.append(rest[p.states.to(rest.device)])

        programs = []
        for b in range(len(passes)):
            programs.append(layerwise.Program(b, lambda b=b: first[b], record=frozenset(ends), stop=max(ends)))
            programs.append(layerwise.Program(b, lambda b=b: first[b], skip=frozenset(self.removed), maps=self.tmaps,
                                              record=frozenset(anchors), stop=max(anchors)))
        self._execute(inputs, programs, on_record).release()
        sums: dict[int, LeastSquares] = {}
        for b in range(len(passes)):
            for c, run in runs.items():
                m = kept[where["m", b, run.anchor]].double().cpu().numpy()
                rest = kept[where["rest", b, run.anchor]].double().cpu().numpy()
                y = kept[where["y", b, run.last]].double().cpu().numpy()
                sums.setdefault(c, LeastSquares(m.shape[-1])).add(m, y - rest, token_weights(y))
        kept.release()
        return sums

    def check(self, batches: Batches, c: int, ls: LeastSquares) -> tuple[str, np.ndarray | None]:
        """The map the final fit's check would keep for candidate ``c`` (None: no map)."""
        from ..repair.linear import removed_runs

        check = Objective(self.objective.family, "kl", self.objective.mask_id, self.objective.ratios,
                          self.objective.seed)
        passes, inputs, first = self.rec.of(batches, check, CHECK_BATCHES)
        run = self._run_of(c, self.removed, self.L)
        removed = [*self.removed, c]
        anchors = {r.anchor for r in removed_runs(removed, self.L)}
        maps = {a: t for a, t in self.maps.items() if a in anchors and a != run.anchor}

        def divergences(trials: dict[str, np.ndarray | None]) -> dict[str, float]:
            names = list(trials)
            tmaps = {name: torch_maps({**maps, run.anchor: t} if t is not None else dict(maps), self.like)
                     for name, t in trials.items()}
            programs = []
            for b in range(len(passes)):
                programs.append(layerwise.Program(b, lambda b=b: first[b]))
                programs += [layerwise.Program(b, lambda b=b: first[b], skip=frozenset(removed), maps=tmaps[name])
                             for name in names]
            finals = self._execute(inputs, programs)
            totals, count, step = dict.fromkeys(names, 0.0), 0, len(names) + 1
            for b, p in enumerate(passes):
                reference = check.reference(self._logits(check, p, finals[b * step]), p)
                for i, name in enumerate(names):
                    totals[name] += check.loss(self._logits(check, p, finals[b * step + 1 + i]), p, reference)[0]
                count += int(p.states.sum() if check.diffusion else p.scored.sum())
            finals.release()
            return {name: total / max(count, 1) for name, total in totals.items()}

        name, t, _ = choose_map(ls, self.ridge, divergences)
        return name, t

    def losses(self, batches: Batches, candidates: list[int], fitted: dict[int, np.ndarray],
               progress: Callable[[], None] | None = None) -> tuple[dict[int, float], float, int]:
        """Each candidate's mean loss, the current model's, and the number of tokens."""
        objective = self.objective
        passes, inputs, first = self.rec.of(batches, objective)
        runs = {c: self._run_of(c, self.removed, self.L) for c in candidates}
        anchors = frozenset(r.anchor for r in runs.values() if r.anchor >= 0)
        kl = objective.kind == "kl"
        # 1. the current model, keeping its state (and MLP output) at every candidate's anchor;
        #    the full model too, for the KL's reference
        front = self.store.series()
        where: dict[tuple[str, int, int], int] = {}

        def on_record(program: int, layer: int, out: torch.Tensor, m: torch.Tensor | None) -> None:
            b = program // (2 if kl else 1)
            where["out", b, layer] = len(front)
            front.append(out)
            if m is not None and self.repair:
                where["m", b, layer] = len(front)
                front.append(m)

        programs = []
        for b in range(len(passes)):
            if kl:
                programs.append(layerwise.Program(b, lambda b=b: first[b]))
            programs.append(layerwise.Program(b, lambda b=b: first[b], skip=frozenset(self.removed), maps=self.tmaps,
                                              record=anchors))
        current_finals = self._execute(inputs, programs, on_record)

        # 2. every candidate from its anchor's state (with its fitted map), the rest of the model
        def entering(c: int, b: int) -> torch.Tensor:
            run = runs[c]
            if run.anchor < 0:
                return first[b]
            out = front[where["out", b, run.anchor]]
            if c in fitted:
                t = torch.as_tensor(fitted[c], dtype=torch.float32, device=self.like.device)
                m = front[where["m", b, run.anchor]]
                return out - self._mapped(run.anchor, m) + (m.float() @ t).to(m.dtype)
            return out

        order = [(c, b) for b in range(len(passes)) for c in candidates]
        trial_programs = [layerwise.Program(b, lambda c=c, b=b: entering(c, b), start=runs[c].last + 1,
                                            skip=frozenset(self.removed),
                                            maps={a: t for a, t in self.tmaps.items() if a > runs[c].last})
                          for c, b in order]
        finals = self._execute(inputs, trial_programs)
        front.release()
        totals = dict.fromkeys(candidates, 0.0)
        current, count = 0.0, 0
        for b, p in enumerate(passes):
            reference = None
            if kl:
                reference = objective.reference(self._logits(objective, p, current_finals[2 * b]), p)
            loss, n = objective.loss(self._logits(objective, p, current_finals[2 * b + 1 if kl else b]), p, reference)
            current, count = current + loss, count + n
            for i, c in enumerate(candidates):
                totals[c] += objective.loss(self._logits(objective, p, finals[b * len(candidates) + i]), p,
                                            reference)[0]
            if progress:
                progress()
        current_finals.release()
        finals.release()
        return {c: v / count for c, v in totals.items()}, current / count, count
