"""PNG plots of an analysis: what a curve shows better than a table.

The decisions each plot makes (axis range, colour range, which cells to outline) are small
pure functions, so they can be tested without reading pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .analysis import Analysis  # noqa: E402

REMOVED = "C3"  # red: the layers a recipe removes
PROTECTED = "0.85"  # light grey: layers no strategy may remove
CMAP = "viridis"  # perceptual, readable in grey and by most colour-blind readers


# --- what the plots decide -----------------------------------------------------------
def default_protected(num_layers: int) -> list[int]:
    """The layers protected when nobody says otherwise: the first and the last."""
    return sorted({0, num_layers - 1})


def similarity_ylim(
    analysis: Analysis, threshold: float | None = None, protected: Sequence[int] | None = None, margin: float = 0.08
) -> tuple[float, float]:
    """The y range of the similarity plot, plus ``margin`` of the span on each side.

    Covers, on every layer that may be removed (not in ``protected``, default first and
    last), the primary group's mean ± std band (clipped to [-1, 1]) and the overlay groups'
    curves, and the threshold. Never forced to 0..1: a band at 0.83-0.97 gets an axis of
    about 0.81-0.99. Protected layers are left out because the first layer (and often the
    last) changes the state far more than the rest and would squash the band where the
    decision is made; the plot marks them at the edge when they fall outside. When every
    layer is protected, all of them count.
    """
    rows = analysis.layers()
    n = len(rows)
    guard = set(default_protected(n)) if protected is None else {p % n for p in protected if -n <= p < n}
    fit = [i for i in range(n) if i not in guard] or list(range(n))
    values = []
    for i in fit:
        mean, std = rows[i]["cosine_mean"], rows[i].get("cosine_std", 0.0)
        values += [max(-1.0, mean - std), min(1.0, mean + std)]
    for group in analysis.overlay_groups():
        curve = analysis.cosine(group)
        values += [curve[i] for i in fit]
    if threshold is not None:
        values.append(threshold)
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return -1.0, 1.0
    lo, hi = min(values), max(values)
    pad = max(margin * (hi - lo), 0.005)
    return lo - pad, hi + pad


def layer_ticks(num_layers: int, every_up_to: int = 40, most: int = 30) -> list[int]:
    """Integer x ticks: every layer up to ``every_up_to`` layers, else the smallest round
    step (2, 5, 10, 20, ...) that leaves at most ``most`` ticks."""
    if num_layers <= every_up_to:
        return list(range(num_layers))
    step = next(s for m in (1, 10, 100, 1000) for s in (2 * m, 5 * m, 10 * m) if num_layers / s <= most)
    return list(range(0, num_layers, step))


def removed_runs(chosen: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed layers, as (first, last) layer, both included."""
    runs: list[list[int]] = []
    for layer in sorted(set(chosen)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return [(a, b) for a, b in runs]


def removed_runs_boxes(chosen: Sequence[int] | None, num_layers: int) -> list[tuple[int, int]]:
    """The heatmap cells to outline: per run of removed layers, (first, last) state, included.

    State l enters layer l and state l+1 leaves it, so a run of layers a..b spans the states
    a..b+1 (rows and columns of the square box). ``chosen=[3, 4, 7]`` gives [(3, 5), (7, 8)].
    """
    chosen = list(chosen or [])
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"removed layers {bad} are out of range for {num_layers} layers")
    return [(a, b + 1) for a, b in removed_runs(chosen)]


def heatmap_range(matrix: Sequence[Sequence[float]], percentile: float = 5.0) -> tuple[float, float]:
    """Colour range of the heatmap: a low percentile of the off-diagonal values, up to 1.

    The percentile is taken over the interior states 1..L-1: the embeddings (state 0) and
    the final output (state L) usually differ from every other state, and with them in the
    range the structure between the middle layers would be one flat colour. Values below
    the range are drawn in the bottom colour (the colour bar says so).
    """
    m = np.asarray(matrix, dtype=float)
    if len(m) > 3:
        m = m[1:-1, 1:-1]
    off = m[~np.eye(len(m), dtype=bool)]
    off = off[np.isfinite(off)]
    if off.size == 0:
        return 0.0, 1.0
    vmin = float(np.percentile(off, percentile))
    return min(vmin, 0.99), 1.0


# --- the plots -----------------------------------------------------------------------
def consecutive_similarity(
    analysis: Analysis,
    path: Path,
    threshold: float | None = None,
    chosen: list[int] | None = None,
    *,
    protected: list[int] | None = None,
) -> None:
    """cos(in, out) per layer with its spread, the threshold, the removed and protected layers.

    The y axis is fitted to the data (:func:`similarity_ylim`). Removed layers get a red
    circle and a light red column; ``protected`` layers (default: first and last) a grey one.
    """
    rows = analysis.layers()
    L = len(rows)
    x = [r["layer"] for r in rows]
    mean = [r["cosine_mean"] for r in rows]
    std = [r.get("cosine_std", 0.0) for r in rows]
    chosen = sorted(set(chosen or []))
    protected = default_protected(L) if protected is None else sorted({p % L for p in protected if -L <= p < L})

    fig, ax = plt.subplots(figsize=(10, 4.4))
    for layer in protected:
        ax.axvspan(layer - 0.5, layer + 0.5, color=PROTECTED, lw=0, zorder=0)
    for layer in chosen:
        ax.axvspan(layer - 0.5, layer + 0.5, color=REMOVED, alpha=0.12, lw=0, zorder=0)
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    alpha=0.2, color="C0", label="± 1 std over tokens")
    ax.plot(x, mean, "o-", color="C0", ms=4, label=f"{analysis.primary} (mean over tokens)")
    for n, group in enumerate(analysis.overlay_groups()):
        ax.plot(x, analysis.cosine(group), ".--", color=f"C{n + 4}", ms=3, lw=1, label=group.replace("_", " "))
    if threshold is not None:
        ax.axhline(threshold, color=REMOVED, lw=1.2, ls=":", label=f"threshold {threshold:g}")
        ax.annotate(f"{threshold:g}", (1.0, threshold), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom",
                    color=REMOVED, fontsize=8)
    if chosen:
        ax.scatter(chosen, [mean[i] for i in chosen], s=120, facecolors="none", edgecolors=REMOVED,
                   linewidths=2, zorder=5, label=f"removed (k={len(chosen)})")
    lo, hi = similarity_ylim(analysis, threshold, protected)
    ax.set_ylim(lo, hi)
    for layer in protected:  # a protected layer off the axis: its value at the edge
        m = mean[layer]
        if not lo <= m <= hi:
            below = m < lo
            ha = "left" if layer == 0 else "right" if layer == L - 1 else "center"
            ax.annotate(f"{'↓' if below else '↑'} {m:.2f}", (layer, lo if below else hi),
                        xytext=(0, 3 if below else -3), textcoords="offset points", ha=ha,
                        va="bottom" if below else "top", fontsize=8, color="C0",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="C0", lw=0.6))
    ax.set_xlim(-0.6, L - 0.4)
    ticks = layer_ticks(L)
    ax.set_xticks(ticks)
    if len(ticks) > 24:
        ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(h_in, h_out)")
    name = Path(analysis.data["model"].get("path") or "").name
    ax.set_title("Layer input/output similarity" + (f" - {name}" if name else ""))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if protected:
        handles.append(Patch(color=PROTECTED, label="protected"))
        labels.append("protected")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def similarity_heatmap(analysis: Analysis, path: Path, chosen: list[int] | None = None) -> None:
    """The (L+1) x (L+1) mean cosine between the states entering/leaving every layer.

    Colour spans the data (:func:`heatmap_range`); each run of removed layers is outlined
    over its states (:func:`removed_runs_boxes`).
    """
    matrix = analysis.matrix()
    boxes = removed_runs_boxes(chosen, len(matrix) - 1)
    vmin, vmax = heatmap_range(matrix)
    below = min(min(row) for row in matrix) < vmin
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(matrix, cmap=CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
    for first, last in boxes:
        ax.add_patch(Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1,
                               fill=False, edgecolor="red", lw=2))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("state j (0 = embeddings, l+1 = output of layer l)")
    ax.set_ylabel("state i")
    k = len(set(chosen or []))
    note = f"{k} removed layer{'s' if k != 1 else ''} outlined in red" if k else "no layer removed"
    ax.set_title(f"Mean cosine similarity between hidden states\n{note}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, extend="min" if below else "neither")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def token_distance_profile(analysis: Analysis, path: Path) -> None:
    """Similarity of two tokens' states as a function of their distance, per layer."""
    prof = analysis.data["token_distance_profile"]
    sims = prof["similarity"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("plasma")
    for i, row in enumerate(sims):
        ax.plot(prof["distances"], row, color=cmap(i / max(1, len(sims) - 1)), lw=1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(sims) - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_xscale("log")
    ax.set_xlabel("token distance")
    ax.set_ylabel("mean cosine between tokens")
    ax.set_title("Recency profile of each layer's output")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
