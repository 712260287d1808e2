"""Plugin discovery over entry points.

Four groups exist: ``repskip.families``, ``repskip.samplers``, ``repskip.benchmarks`` and
``repskip.objectives`` (what healing trains a family's models on).
The built-in plugins in ``plugins/`` register through these groups exactly as a third-party
package does; the core never imports them by name. A plugin that fails to import is named in
one warning line and skipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

GROUPS = {
    "families": "repskip.families",
    "samplers": "repskip.samplers",
    "benchmarks": "repskip.benchmarks",
    "objectives": "repskip.objectives",
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


@dataclass(frozen=True)
class PluginInfo:
    group: str
    name: str
    target: str
    distribution: str
    version: str
    obj: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_cache: dict[str, list[PluginInfo]] = {}


def _scan(group: str) -> list[PluginInfo]:
    found = []
    for ep in sorted(metadata.entry_points(group=GROUPS[group]), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must never take the CLI down
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(
                f"plugin {ep.name!r} ({GROUPS[group]}, from {dist_name}) failed to load and "
                f"was skipped: {message}",
                PluginWarning,
                stacklevel=3,
            )
            found.append(PluginInfo(group, ep.name, ep.value, dist_name, version, error=message))
            continue
        found.append(PluginInfo(group, ep.name, ep.value, dist_name, version, obj=obj))
    return found


def plugins(group: str, refresh: bool = False) -> list[PluginInfo]:
    """Every plugin registered in ``group`` (``families``, ``samplers``, ``benchmarks`` or ``objectives``)."""
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; known: {', '.join(GROUPS)}")
    if refresh or group not in _cache:
        _cache[group] = _scan(group)
    return _cache[group]


def loaded(group: str) -> dict[str, Any]:
    """Name -> loaded object for the plugins of ``group`` that imported cleanly."""
    return {p.name: p.obj for p in plugins(group) if p.ok}


def create(group: str, name: str) -> Any:
    """An instance of the plugin ``name`` of ``group``, or a RepskipError listing the known ones."""
    from .errors import RepskipError

    available = loaded(group)
    if name not in available:
        known = ", ".join(sorted(available)) or "none installed"
        kind = group.rstrip("s")
        raise RepskipError(f"unknown {kind} {name!r}; installed {group}: {known}")
    return available[name]()


def refresh() -> None:
    """Forget what was discovered, so newly installed plugins are seen."""
    _cache.clear()
