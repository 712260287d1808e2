"""Strategies that turn an analysis into the list of layers to remove.

- ``paper``: Goel et al.'s Algorithm 1. Candidates are layers whose mean cos(in, out) exceeds
  the threshold; take the most similar first, never two adjacent ones, until k are chosen.
- ``block-influence``: ShortGPT. Remove the k layers of lowest Block Influence
  BI = 1 - E[cos(in, out)]; adjacent layers allowed.
- ``angular-block``: Gromov et al. Remove the contiguous block of k layers whose input and
  output are closest in angular distance arccos(cos(h_l, h_{l+k})) / pi, on the last token.
- ``loss``, ``greedy-loss``: the calibration loss a removal costs (repskip.analyze.search).
- ``auto``: the proposals of the three above, each repaired and scored on the calibration loss
  (repskip.analyze.auto); the lowest wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from ..errors import RepskipError

if TYPE_CHECKING:  # the analysis module needs torch; choosing layers does not
    from .analysis import Analysis

STRATEGIES = ("auto", "paper", "block-influence", "angular-block", "loss", "greedy-loss")
LOSS_STRATEGIES = ("loss", "greedy-loss")  # they run the model: repskip.analyze.search
RUNS_MODEL = (*LOSS_STRATEGIES, "auto")  # choosing needs the model, not the analysis alone


@dataclass(frozen=True)
class Selection:
    remove: list[int]
    metric: str  # what the scores are
    group: str  # which position group they were measured on
    scores: list[float | None]  # one per layer (per block start for angular-block); None: not scored


def protected_layers(num_layers: int, protect_first: bool, protect_last: bool, protect: list[int]) -> set[int]:
    out = set()
    if protect_first:
        out.add(0)
    if protect_last:
        out.add(num_layers - 1)
    for i in protect:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise RepskipError(
                f"protected layer {i} is out of range for a {num_layers}-layer model"
            )
        out.add(j)
    return out


def _take(order: list[int], k: int, allow_adjacent: bool) -> list[int]:
    """The first k of ``order``, skipping any layer next to one already taken if asked."""
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if not allow_adjacent and any(abs(i - j) == 1 for j in chosen):
            continue
        chosen.append(i)
    return chosen


def paper(analysis: "Analysis", k: int, threshold: float, allow_adjacent: bool, protected: set[int]) -> Selection:
    cos = analysis.cosine()
    order = sorted(
        (i for i in range(len(cos)) if i not in protected and cos[i] > threshold),
        key=lambda i: -cos[i],
    )
    chosen = _take(order, k, allow_adjacent)
    if len(chosen) < k:
        rule = "" if allow_adjacent else ", no two adjacent"
        raise RepskipError(
            f"only {len(chosen)} layer(s) qualify for the paper strategy (cosine > {threshold}, "
            f"not protected{rule}) but k={k}: lower --threshold or -k"
        )
    return Selection(sorted(chosen), "cosine_mean", analysis.primary, cos)


def block_influence(analysis: "Analysis", k: int, allow_adjacent: bool, protected: set[int]) -> Selection:
    bi = analysis.block_influence()
    order = sorted((i for i in range(len(bi)) if i not in protected), key=lambda i: bi[i])
    chosen = _take(order, k, allow_adjacent)
    if len(chosen) < k:
        raise RepskipError(
            f"only {len(chosen)} layer(s) can be removed under the protection and adjacency "
            f"rules but k={k}: lower -k or protect fewer layers"
        )
    return Selection(sorted(chosen), "block_influence", analysis.primary, bi)


def angular_block(analysis: "Analysis", k: int, protected: set[int]) -> Selection:
    # Gromov et al. measure the last token; diffusion analyses have no such group.
    group = "last_token" if "last_token" in analysis.data["groups"] else analysis.primary
    measured = analysis.data["groups"][group]
    L = analysis.num_layers
    if "angular_distance_matrix" not in measured and "similarity_matrix" not in measured:
        raise RepskipError(f"the analysis holds no layer x layer matrix for group {group!r}, which angular-block "
                           "needs; re-run 'repskip analyze'")
    if "angular_distance_matrix" in measured:  # the mean of per-sequence angles, as Gromov et al.
        angles = measured["angular_distance_matrix"]
        distances = [angles[start][start + k] for start in range(L - k + 1)]
    else:  # only the mean cosine was kept for this group: the angle of the mean
        matrix = measured["similarity_matrix"]
        distances = [math.acos(max(-1.0, min(1.0, matrix[s][s + k]))) / math.pi for s in range(L - k + 1)]
    allowed = [s for s in range(L - k + 1) if not protected & set(range(s, s + k))]
    if not allowed:
        raise RepskipError(
            f"no block of {k} contiguous layers avoids the protected layers: lower -k"
        )
    best = min(allowed, key=lambda s: distances[s])
    return Selection(list(range(best, best + k)), f"angular_distance_block_{k}", group, distances)


def by_loss(analysis: "Analysis", strategy: str, k: int, allow_adjacent: bool, protected: set[int]) -> Selection:
    """The layers a recorded loss search chose (see repskip.analyze.search); scores are each
    layer's calibration loss with it removed alone (first round), None where not scored."""
    from .search import chosen_layers

    data = analysis.data.get("search")
    if not data:
        raise RepskipError(f"the analysis holds no loss search, which {strategy} needs: run 'repskip analyze "
                           f"--strategy {strategy}' (it runs the model on the calibration text)")
    chosen = chosen_layers(data, strategy, k, protected, allow_adjacent)
    first = {int(c): v for c, v in data["rounds"][0]["losses"].items()}
    scores = [first.get(i) for i in range(analysis.num_layers)]
    return Selection(chosen, f"{data['objective']}_with_layer_removed", "calibration", scores)


def by_auto(analysis: "Analysis", k: int, threshold: float, allow_adjacent: bool | None,
            protected: set[int]) -> Selection:
    """The removal a recorded ``auto`` choice made (see repskip.analyze.auto), refused when the
    record was made for another k or other rules; no per-layer scores (the candidates, with
    their losses, are the record)."""
    data = analysis.data.get("auto")
    if not data:
        raise RepskipError("the analysis holds no auto choice, which --strategy auto needs: run 'repskip analyze "
                           "--strategy auto' (it repairs and scores each strategy's proposal on the calibration text)")
    asked = {"k": k, "threshold": threshold, "allow_adjacent": allow_adjacent, "protected": sorted(protected)}
    differs = [f"{key} {data.get(key)} there, {value} here" for key, value in asked.items() if data.get(key) != value]
    if differs:
        raise RepskipError(f"the analysis's auto choice was made with other settings ({'; '.join(differs)}): re-run "
                           f"'repskip analyze --strategy auto' with these (it reuses the measurements)")
    metric = f"{data['objective']}_after_repair" if data["repair"] else f"{data['objective']}_with_layers_removed"
    return Selection(sorted(data["chosen"]), metric, "calibration", [None] * analysis.num_layers)


def check_feasible(num_layers: int, strategy: str, k: int, *, allow_adjacent: bool | None = None,
                   protect_first: bool = True, protect_last: bool = True, protect: list[int] | None = None) -> None:
    """Refuse, before any analysis runs, a choice that no analysis could satisfy: k not below
    the layer count, protected layers out of range, or fewer removable layers than k under
    the protection and adjacency rules (the paper's threshold needs the analysis to check)."""
    if k < 1:
        raise RepskipError(f"k must be at least 1, got {k}")
    if k >= num_layers:
        raise RepskipError(f"k={k} would remove every layer of a {num_layers}-layer model; choose k < {num_layers}")
    guarded = protected_layers(num_layers, protect_first, protect_last, protect or [])
    free = [i for i in range(num_layers) if i not in guarded]
    if strategy == "angular-block":
        runs = _runs(free)
        if not any(len(run) >= k for run in runs):
            raise RepskipError(f"no block of {k} contiguous layers avoids the protected layers {sorted(guarded)}: "
                               "lower -k or protect fewer layers")
        return
    # auto: block influence, the most permissive proposer, must be able to choose
    adjacent = allow_adjacent if allow_adjacent is not None else strategy != "paper"
    most = len(free) if adjacent else sum((len(run) + 1) // 2 for run in _runs(free))
    if most < k:
        rule = "" if adjacent else " with no two adjacent"
        raise RepskipError(f"at most {most} of the {num_layers} layers can be removed (protected: {sorted(guarded)}"
                           f"{rule}) but k={k}: lower -k or protect fewer layers")


def _runs(indices: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive indices."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def select(
    analysis: "Analysis",
    strategy: str,
    k: int,
    *,
    threshold: float = 0.95,
    allow_adjacent: bool | None = None,
    protect_first: bool = True,
    protect_last: bool = True,
    protect: list[int] | None = None,
) -> Selection:
    L = analysis.num_layers
    if k < 1:
        raise RepskipError(f"k must be at least 1, got {k}")
    if k >= L:
        raise RepskipError(f"k={k} would remove every layer of a {L}-layer model; choose k < {L}")
    guarded = protected_layers(L, protect_first, protect_last, protect or [])
    if strategy == "paper":
        return paper(analysis, k, threshold, bool(allow_adjacent), guarded)
    if strategy == "block-influence":
        return block_influence(analysis, k, True if allow_adjacent is None else allow_adjacent, guarded)
    if strategy == "angular-block":
        return angular_block(analysis, k, guarded)
    if strategy == "auto":
        return by_auto(analysis, k, threshold, allow_adjacent, guarded)
    if strategy in LOSS_STRATEGIES:
        return by_loss(analysis, strategy, k, True if allow_adjacent is None else allow_adjacent, guarded)
    raise RepskipError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
