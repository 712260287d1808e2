"""Reading the runs a comparison overlays, and what each can show."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import registry
from ..analyze.analysis import Analysis
from ..errors import RepskipError

MAX_BYTES = 256 * 1024 * 1024  # an analysis holds a few matrices of layers x layers: far below
VIEWS = ("similarity", "matrix", "distance", "retention")


@dataclass
class Point:
    """One verify report: the share of layers removed and each benchmark's retention."""

    removed: int
    layers: int
    retention: dict[str, tuple[float, float, float]]  # bench -> (retention, ci low, ci high)
    path: str

    @property
    def fraction(self) -> float:
        return self.removed / self.layers if self.layers else 0.0


@dataclass
class Series:
    """Everything given about one model."""

    fingerprint: str
    label: str
    family: str = "?"
    kind: str = "?"
    analysis: Analysis | None = None
    points: list[Point] = field(default_factory=list)

    def views(self) -> set[str]:
        out = set()
        if self.analysis is not None:
            out.add("similarity")
            group = self.analysis.data["groups"][self.analysis.primary]
            if "similarity_matrix" in group:
                out.add("matrix")
            if self.analysis.data.get("token_distance_profile", {}).get("distances"):
                out.add("distance")
        if self.points:
            out.add("retention")
        return out


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_BYTES:
        raise RepskipError(f"{path} is larger than {MAX_BYTES >> 20} MB; it is not a repskip analysis or report")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RepskipError(f"{path} is not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RepskipError(f"{path} is not a repskip analysis or verify report")
    return data


def _files(run: Path) -> list[Path]:
    if run.is_file():
        return [run]
    if run.is_dir():
        found = [run / name for name in ("analysis.json", "report.json") if (run / name).is_file()]
        if found:
            return found
        raise RepskipError(f"{run} holds no analysis.json or report.json; give an analyze or verify output folder")
    raise RepskipError(f"{run} does not exist")


def load_series(runs: list[Path], labels: list[str] | None = None) -> list[Series]:
    """The series the runs make, in the order their models first appear; ``labels`` name
    them in that order (default: the model folder's name)."""
    series: dict[str, Series] = {}
    for run in runs:
        for file in _files(Path(run)):
            data = _read_json(file)
            kind = data.get("kind")
            if kind == "repskip.analysis":
                analysis = Analysis.from_dict(data, str(file))
                model = data["model"]
                s = series.setdefault(model["fingerprint"], Series(model["fingerprint"], Path(model.get("path") or "?").name))
                if s.analysis is not None:
                    raise RepskipError(f"{file} analyses the same model as another run given; give one analysis per model")
                s.analysis, s.family = analysis, model["family"]
                family = registry.loaded("families").get(s.family)
                s.kind = getattr(family, "generative_kind", "?")
            elif kind == "repskip.verify":
                base, comp = data.get("base") or {}, data.get("compressed") or {}
                try:
                    layers, kept = int(base["layers"]), int(comp["layers"])
                    retention = {name: (float(e["retention"]), *map(float, e["retention_ci95"]))
                                 for name, e in data["benchmarks"].items()}
                except (KeyError, TypeError, ValueError):
                    raise RepskipError(f"{file} is an incomplete verify report; re-run 'repskip verify'") from None
                s = series.setdefault(base.get("fingerprint", "?"), Series(base.get("fingerprint", "?"),
                                                                             Path(base.get("path") or "?").name))
                s.points.append(Point(layers - kept, layers, retention, str(file)))
            else:
                raise RepskipError(f"{file} is neither a repskip analysis nor a verify report (kind {kind!r})")
    out = list(series.values())
    if len(out) < 2:
        raise RepskipError("compare needs runs of at least two models; these all describe one")
    if labels:
        if len(labels) != len(out):
            raise RepskipError(f"{len(labels)} --label given for {len(out)} models ({', '.join(s.label for s in out)})")
        for s, label in zip(out, labels):
            s.label = label
    for s in out:
        s.points.sort(key=lambda p: p.removed)
    return out


def common_views(series: list[Series]) -> list[str]:
    """The views every series has; none is a one-line error."""
    shared = set.intersection(*(s.views() for s in series))
    if not shared:
        have = "; ".join(f"{s.label}: {', '.join(sorted(s.views())) or 'nothing'}" for s in series)
        raise RepskipError(f"the runs share no view to compare ({have}); give each model an analysis, "
                           "or verify reports for each")
    return [v for v in VIEWS if v in shared]
