"""The ``repskip`` command line: argument parsing and printing over repskip.pipeline. The group
is in app.py; each module beside it adds one stage's commands to it."""

from . import analyze, calibrate, compress, heal, tools, verify  # noqa: F401  (each registers its commands)
from .app import main

__all__ = ["main"]
