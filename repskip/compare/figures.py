"""One figure per view, every series in it. Models of different depths share an x axis by
relative depth (layer / (layers - 1)), so that a 16-layer and a 32-layer model line up."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..analyze.plots import CMAP  # noqa: E402
from .load import Series  # noqa: E402

FILES = {"similarity": "compare_similarity.png", "matrix": "compare_matrix.png",
         "distance": "compare_distance.png", "retention": "compare_retention.png"}


def relative_depth(n: int) -> np.ndarray:
    return np.arange(n) / max(n - 1, 1)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _similarity(series: list[Series], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for s in series:
        cos = s.analysis.cosine()
        ax.plot(relative_depth(len(cos)), cos, marker="o", ms=3, lw=1.2, label=f"{s.label} ({len(cos)} layers)")
    _label(ax, "relative depth (layer / last layer)", "cos(layer input, layer output)",
           "How much each layer changes the representation (higher: more redundant)")
    _save(fig, path)


def _matrix(series: list[Series], path: Path) -> None:
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series) + 0.8, 3.6), squeeze=False)
    matrices = [np.asarray(s.analysis.matrix(), dtype=float) for s in series]
    inner = np.concatenate([m[1:, 1:][~np.eye(len(m) - 1, dtype=bool)] for m in matrices])
    vmin, vmax = (float(inner.min()), float(inner.max())) if inner.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:  # one value everywhere: a range around it, or nothing is drawn
        vmin, vmax = vmin - 0.05, vmax + 0.05
    for ax, s, m in zip(axes[0], series, matrices):
        im = ax.imshow(m, cmap=CMAP, vmin=vmin, vmax=vmax, origin="upper")
        ax.set_title(s.label, fontsize=9)
        ax.set_xlabel("state after layer (0: embeddings)", fontsize=8)
        ax.set_ylabel("state after layer", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="cosine", shrink=0.85)
    fig.suptitle("Layer x layer similarity of the hidden states (one colour scale)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _distance(series: list[Series], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in series:
        prof = s.analysis.data["token_distance_profile"]
        sims = np.asarray(prof["similarity"], dtype=float)
        ax.plot(prof["distances"], sims[-1], lw=1.5, label=f"{s.label}: last layer")
        ax.plot(prof["distances"], sims[len(sims) // 2], lw=1, ls="--", label=f"{s.label}: middle layer")
    ax.set_xscale("log")
    _label(ax, "token distance", "mean cosine between two tokens' states", "Recency profile")
    _save(fig, path)


def _retention(series: list[Series], path: Path) -> None:
    benches = sorted({b for s in series for p in s.points for b in p.retention})
    fig, axes = plt.subplots(1, len(benches), figsize=(4.6 * len(benches), 4), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for s in series:
            pts = [p for p in s.points if bench in p.retention]
            if not pts:
                continue
            x = [p.fraction for p in pts]
            y = [p.retention[bench][0] for p in pts]
            err = [[y_ - p.retention[bench][1] for y_, p in zip(y, pts)],
                   [p.retention[bench][2] - y_ for y_, p in zip(y, pts)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=s.label)
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.axhline(0.9, color="0.6", lw=0.8, ls=":")
        _label(ax, "share of layers removed", "retention (1: nothing lost), 95% CI", bench)
    _save(fig, path)


DRAW = {"similarity": _similarity, "matrix": _matrix, "distance": _distance, "retention": _retention}


def write_figures(series: list[Series], views: list[str], folder: Path) -> list[str]:
    """Draw each view into ``folder``; the file names written."""
    for view in views:
        DRAW[view](series, folder / FILES[view])
    return [FILES[v] for v in views]
