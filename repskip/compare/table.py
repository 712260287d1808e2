"""The comparison's numbers, one row per model."""

from __future__ import annotations

from .load import Series

REDUNDANT = 0.95  # a layer whose output keeps this cosine with its input barely changes it


def summary(series: list[Series], views: list[str]) -> list[dict]:
    rows = []
    for s in series:
        row: dict = {"label": s.label, "family": s.family, "kind": s.kind, "fingerprint": s.fingerprint}
        if "similarity" in views:
            cos = s.analysis.cosine()
            inner = cos[1:-1] or cos  # the first and last layers are protected by every strategy
            order = sorted(range(1, len(cos) - 1) or range(len(cos)), key=lambda i: -cos[i])
            row.update(layers=len(cos), mean_cosine=sum(inner) / len(inner),
                       redundant_share=sum(c >= REDUNDANT for c in inner) / len(inner),
                       most_redundant=[{"layer": i, "depth": i / max(len(cos) - 1, 1), "cosine": cos[i]}
                                       for i in order[:3]])
        if "retention" in views:
            row["retention"] = [{"removed": p.removed, "layers": p.layers, "fraction": p.fraction,
                                 "benchmarks": {b: {"retention": r[0], "ci95": [r[1], r[2]]}
                                                for b, r in p.retention.items()}, "report": p.path}
                                for p in s.points]
        rows.append(row)
    return rows
