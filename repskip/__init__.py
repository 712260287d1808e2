"""repskip: measure how much each decoder layer changes the representation, turn that into
a skip recipe, and physically remove the skipped layers.

The library calls behind the CLI live in :mod:`repskip.pipeline`.
"""

__version__ = "0.1.0"
