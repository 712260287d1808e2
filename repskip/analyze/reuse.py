"""Reusing a finished analysis: ``repskip analyze`` into a run folder that already holds an
analysis of the same model, calibration text and measurement settings chooses again from it
instead of running the model over the calibration text again.

What must match is what the measurements depend on: the checkpoint's fingerprint, the
calibration tokens (their hash, so an edited calibration file is noticed), and the settings
recorded under ``settings`` in analysis.json. How layers are then chosen (strategy, k,
threshold, protection) is free: that is what a reuse is for. A recorded loss search is reused
only when the search itself would be the same (strategy, objective, repair, sequences,
protection, adjacency, ridge, and depth for a greedy search).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RepskipError
from .analysis import Analysis

# The settings of analysis.json that change the measurements (batch size included: the
# layer x layer matrix samples a bounded number of tokens per batch).
MEASURED = ("mode", "num_samples", "calib_field", "positions", "batch_size", "seed", "matrix_tokens",
            "mask_ratios", "prompt_fraction")


# What a finished ``repskip analyze`` leaves in its folder. A reuse replaces the folder without
# --force, so it happens only where nothing else is there: a file of the user's stops it.
WRITTEN = {"analysis.json", "recipe.yaml", "repair.safetensors", "similarity.png", "similarity_matrix.png",
           "token_distance.png", "status.json"}


def foreign_files(folder: Path) -> list[str]:
    """Names in ``folder`` that analyze did not write (its marker aside)."""
    from ..outputs import MARKER

    return sorted(p.name for p in Path(folder).iterdir() if p.name not in WRITTEN | {MARKER})


def previous(folder: Path) -> Analysis | None:
    """The analysis a finished ``repskip analyze`` left in ``folder`` (with repskip's output
    marker, and nothing but analyze's files), or None."""
    from ..outputs import MARKER

    path = Path(folder) / "analysis.json"
    if not path.is_file() or not (Path(folder) / MARKER).is_file() or foreign_files(folder):
        return None
    try:
        return Analysis.from_dict(json.loads(path.read_text("utf-8")), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RepskipError):
        return None


def mismatch(analysis: Analysis, *, fingerprint: str, calibration_hash: str, settings: dict,
             dtype: str | None) -> str | None:
    """Why ``analysis`` cannot stand for a new one with these inputs, or None when it can.
    ``settings``: the MEASURED settings as analysis.json would record them (the mode
    resolved; the masking settings only in masked mode);
    ``dtype``: the dtype asked for, None for the checkpoint's own."""
    data = analysis.data
    if data["model"].get("fingerprint") != fingerprint:
        return "it measured another checkpoint"
    if data["calibration"].get("hash") != calibration_hash:
        return "its calibration tokens differ (another text, length or sample count)"
    if data["settings"].get("mode") == "sampling":
        return "sampling-mode analyses are not reused"
    recorded = data["settings"]
    for key in MEASURED:
        if recorded.get(key) != settings.get(key):
            return f"its {key.replace('_', ' ')} was {recorded.get(key)!r}, now {settings.get(key)!r}"
    if dtype is not None and recorded.get("dtype") != dtype:
        return f"it measured in {recorded.get('dtype')}, now {dtype}"
    return None


def search_matches(record: dict | None, request: dict) -> bool:
    """Whether a recorded loss search is the one ``request`` would run (see loss_search)."""
    if not record:
        return False
    for key in ("strategy", "objective", "repair", "sequences", "protected", "allow_adjacent", "ridge"):
        if key not in record or record[key] != request[key]:
            return False
    if request["repair"] and record.get("checked_choices") is not True:
        return False
    if request["strategy"] == "greedy-loss":
        return len(record["rounds"]) >= request["k"]
    return True


def describe(analysis: Analysis) -> str:
    data = analysis.data
    cal = data["calibration"]
    return (f"{cal['sequences']} sequences, {cal['tokens']} tokens of {cal['source']}, measured in "
            f"{data['settings'].get('dtype')} on {data['settings'].get('device')} at {data.get('created', '?')}")


def calibration_hash(handle: Any, calib: str | None, calib_field: str | None, num_samples: int, max_length: int,
                     seed: int) -> str:
    """The hash of the calibration tokens ``repskip analyze`` would measure (tokenizer only)."""
    from . import calibration

    tokenizer = handle.family.load_tokenizer(handle.path)
    return calibration.build(tokenizer, calib, field=calib_field, num_samples=num_samples,
                             max_length=max_length, seed=seed).hash
