"""``--strategy auto``: the similarity strategies' candidates, each repaired and scored on the loss.

Which similarity strategy removes best depends on the model and on k (docs/benchmarks.md):
the angular block with a repair leads on some models and values of k and collapses on others,
where block influence holds. ``auto`` therefore lets the calibration loss decide between
their proposals:

1. candidates: the removals that paper, block-influence and angular-block choose at k from the
   analysis, and the two contiguous blocks of k next to the angular block's (one layer
   earlier, one later), each under the protection and adjacency rules; a strategy that can
   choose nothing (paper's threshold) proposes nothing. Equal removals are one candidate.
2. with repair, each candidate's maps are fitted on the calibration sequences after the first
   ``search_samples``, through the final fit's own code (repskip.repair.sweep, one sweep of
   the full model shared by all candidates);
3. each candidate is scored on the first ``search_samples`` sequences (text no map was fitted
   on), with the loss the loss search scores its trials with (``objective``), all candidates
   in one sweep of the model (repskip.engine.layerwise.execute: each layer is read once, so
   a model run from disk costs one stream of its weights);
4. the lowest loss wins (ties: the earlier candidate), once its maps have passed the final
   fit's KL check: as in the loss search, only the winner is checked, and if the check keeps
   other maps (a stronger ridge, or none) it is scored again with those and the choice made
   again. The record keeps every candidate with its loss, the maps the check kept (winners
   only) and the seconds its fit took (its own pruned sweep and an equal share of the full
   one).

The proposals cost one sweep of the full model over the fit text, one pruned sweep each, and
one scoring sweep, where greedy-loss with the repair in the loop costs k rounds of a fit and
a trial per layer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import RepskipError
from .objective import Objective

if TYPE_CHECKING:
    from ..repair.fit import Batches
    from .analysis import Analysis

PROPOSERS = ("block-influence", "angular-block", "paper")  # the order ties are broken in


def candidates(analysis: "Analysis", k: int, *, threshold: float, allow_adjacent: bool | None,
               protect_first: bool, protect_last: bool, protect: list[int] | None,
               repair: bool) -> tuple[list[tuple[list[int], list[str]]], dict[str, str]]:
    """The distinct removals proposed at ``k`` (each with the strategies proposing it), and
    for each strategy that proposed nothing, why."""
    from .selection import protected_layers, select

    L = analysis.num_layers
    guarded = protected_layers(L, protect_first, protect_last, protect or [])
    proposals: dict[tuple[int, ...], list[str]] = {}
    declined: dict[str, str] = {}

    def propose(remove: Sequence[int], name: str) -> None:
        if repair and 0 in remove:  # a repair folds into the layer in front of a run; layer 0 has none
            declined[name] = "it removes layer 0, which no repair can follow"
            return
        proposals.setdefault(tuple(sorted(remove)), []).append(name)

    for strategy in PROPOSERS:
        try:
            chosen = select(analysis, strategy, k, threshold=threshold, allow_adjacent=allow_adjacent,
                            protect_first=protect_first, protect_last=protect_last, protect=protect).remove
        except RepskipError as exc:
            declined[strategy] = str(exc)
            continue
        propose(chosen, strategy)
        if strategy == "angular-block":
            for shift, name in ((-1, "angular-block, one layer earlier"), (1, "angular-block, one layer later")):
                block = [i + shift for i in chosen]
                if block[0] >= 0 and block[-1] < L and not guarded & set(block):
                    propose(block, name)
    if not proposals:
        raise RepskipError(f"no strategy proposes {k} layers to remove under the protection and adjacency rules "
                           f"({'; '.join(f'{s}: {why}' for s, why in declined.items())}): lower -k")
    return [(list(r), names) for r, names in proposals.items()], declined


@torch.inference_mode()
def score(model: Any, family: Any, batches: "Batches", objective: Objective,
          trials: Sequence[tuple[Sequence[int], dict[int, np.ndarray]]]) -> tuple[list[float], float, int]:
    """Each trial's mean calibration loss (``objective``) over ``batches``, the trial being the
    model with its layers skipped and its maps (anchor -> T) on the MLP outputs; with the full
    model's loss and the number of scored tokens. Every trial runs in one sweep, layer by
    layer."""
    from ..engine import layerwise
    from ..engine.states import store_for
    from ..repair.fit import torch_maps
    from ..runtime import model_device
    from .search_streamed import Recordings
    from .surgery import Surgery

    L = len(family.decoder_layers(model))
    like = torch.empty(0, device=model_device(model))
    everything = [((), {}), *trials]  # the full model first: the base loss, and kl's reference
    with Surgery(model, family) as s, contextlib.ExitStack() as cleanup:
        recordings = Recordings(model, family, store_for(model))
        cleanup.callback(recordings.store.clear)
        passes, inputs, first = recordings.of(batches, objective)
        programs = [layerwise.Program(batch=b, state=lambda b=b: first[b], skip=frozenset(skip),
                                      maps=torch_maps(maps, like))
                    for skip, maps in everything for b in range(len(passes))]
        finals = layerwise.execute(model, family, s, inputs, programs, store=recordings.store)
        totals, count = [0.0] * len(everything), 0
        for b, p in enumerate(passes):
            references = None
            for t in range(len(everything)):
                s.set(skip=range(L - 1), replay={L - 1: finals[t * len(passes) + b]})  # the final norm and head
                logits = objective.logits(model, p)
                if t == 0:
                    references = objective.reference(logits, p)
                loss, n = objective.loss(logits, p, references)
                totals[t] += loss
            count += n
        s.set()
        finals.release()
    return [total / max(count, 1) for total in totals[1:]], totals[0] / max(count, 1), count


def choose(model: Any, family: Any, proposals: list[tuple[list[int], list[str]]], *, batches: "Batches",
           fit_batches: "Batches | None", objective: Objective, repair: bool, ridge: float,
           progress: Callable[[int, int], None] | None = None, method: str = "linear") -> dict:
    """Fit (with ``repair``) and score every proposal; the record ``analysis.json`` keeps under
    ``auto``, with the winner under ``chosen``.

    As the loss search does, the maps are scored as fitted and only the winner's go through the
    KL check: if the check would keep other maps (a stronger ridge, or none for a run), the
    winner is scored again with those and the choice is made again, until the winner is a
    candidate scored with the maps the check keeps."""
    from ..repair.sweep import fit_linear_many

    L = len(family.decoder_layers(model))
    start = time.perf_counter()
    fit_text = fit_batches or batches
    fit_steps = [0]  # the fits' layer steps; then two more: the scoring, the winner's check

    def fit_progress(done: int, total: int) -> None:
        fit_steps[0] = total
        if progress:
            progress(done, total + 2)

    records, trials = [], []
    fits = fit_linear_many(model, family, fit_text, objective, [r for r, _ in proposals], L, ridge, fit_progress, method,
                           check=False) if repair else [None] * len(proposals)
    for (remove, names), fit in zip(proposals, fits):
        records.append({"remove": remove, "proposed_by": names, "maps_kept": None,
                        "fit_seconds": round(fit.seconds, 2) if fit else 0.0})
        trials.append((remove, fit.maps if fit else {}))
    t0 = time.perf_counter()
    losses, base, tokens = score(model, family, batches, objective, trials)
    score_seconds = time.perf_counter() - t0
    if progress:
        progress(fit_steps[0] + 1, fit_steps[0] + 2)
    for record, loss in zip(records, losses):
        record["loss"] = round(loss, 6)
    while True:
        best = min(range(len(records)), key=lambda i: (losses[i], i))
        record = records[best]
        if not repair or record["maps_kept"] is not None:
            break
        t0 = time.perf_counter()
        (checked,) = fit_linear_many(model, family, fit_text, objective, [record["remove"]], L, ridge, method=method)
        record["maps_kept"] = {str(d["anchor"]): d["kept"] for d in checked.details}
        record["check_seconds"] = round(time.perf_counter() - t0, 2)
        fitted = trials[best][1]
        if checked.maps.keys() != fitted.keys() or any((checked.maps[a] != fitted[a]).any() for a in fitted):
            t0 = time.perf_counter()
            losses[best] = score(model, family, batches, objective, [(record["remove"], checked.maps)])[0][0]
            score_seconds += time.perf_counter() - t0
            record["loss_as_fitted"], record["loss"] = record["loss"], round(losses[best], 6)
    if progress:
        progress(fit_steps[0] + 2, fit_steps[0] + 2)
    return {"candidates": records, "chosen": records[best]["remove"], "base_loss": round(base, 6),
            "tokens": tokens, "score_seconds": round(score_seconds, 2),
            "seconds": round(time.perf_counter() - start, 2)}
