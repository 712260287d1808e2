"""PNG plots of an analysis: what a curve shows better than a table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .analysis import Analysis  # noqa: E402


def consecutive_similarity(
    analysis: Analysis, path: Path, threshold: float | None = None, chosen: list[int] | None = None
) -> None:
    """cos(in, out) per layer with its spread, the threshold and the chosen layers."""
    rows = analysis.layers()
    x = [r["layer"] for r in rows]
    mean = [r["cosine_mean"] for r in rows]
    std = [r["cosine_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    alpha=0.2, color="C0", label="± 1 std over tokens")
    ax.plot(x, mean, "o-", color="C0", ms=4, label=f"{analysis.primary} (mean over tokens)")
    for n, group in enumerate(analysis.overlay_groups()):
        ax.plot(x, analysis.cosine(group), ".--", color=f"C{n + 2}", ms=3, lw=1, label=group.replace("_", " "))
    if threshold is not None:
        ax.axhline(threshold, color="C3", lw=1, ls=":", label=f"threshold {threshold}")
    if chosen:
        ax.scatter(chosen, [mean[i] for i in chosen], s=110, facecolors="none", edgecolors="C3",
                   linewidths=2, zorder=5, label="removed")
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(h_in, h_out)")
    ax.set_title(f"Layer input/output similarity - {Path(analysis.data['model']['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def similarity_heatmap(analysis: Analysis, path: Path) -> None:
    """The (L+1) x (L+1) mean cosine between the states entering/leaving every layer."""
    matrix = analysis.matrix()
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, min(map(min, matrix))), vmax=1.0)
    ax.set_xlabel("state j (0 = embeddings, l+1 = output of layer l)")
    ax.set_ylabel("state i")
    ax.set_title("Mean cosine similarity between hidden states")
    fig.colorbar(im, ax=ax, fraction=0.046)
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
