"""Tool versions for provenance, read from package metadata (importing torch or transformers
just to ask their version would cost seconds and hundreds of MB)."""

from __future__ import annotations

from importlib import metadata

from . import __version__


def versions(packages: tuple[str, ...] = ("torch", "transformers")) -> dict[str, str]:
    out = {"repskip": __version__}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
