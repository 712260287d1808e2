"""The fitted maps on disk: one safetensors file beside the recipe, named and hashed in it.

The file holds ``map.{anchor}`` [hidden, hidden] float32 tensors, one per removed run, keyed
by the original index of the kept layer the map folds into. A recipe refers to it by a path
relative to the recipe's own folder and by its SHA-256, so a map file and a recipe that were
not made together never meet.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import RepskipError
from ..outputs import write_atomic

FORMAT = "repskip.repair"
DEFAULT_NAME = "repair.safetensors"


def _key(anchor: int) -> str:
    return f"map.{anchor}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def serialize(maps: dict[int, np.ndarray], method: str = "linear") -> tuple[bytes, str]:
    """The file's bytes (float32 maps) and their hash."""
    from safetensors.numpy import save as to_bytes

    tensors = {_key(a): np.ascontiguousarray(t, dtype=np.float32) for a, t in sorted(maps.items())}
    # one metadata key: safetensors writes several in no fixed order, and the same maps must
    # give the same bytes (the hash names them in recipes and verify caches)
    about = json.dumps({"format": FORMAT, "method": method, "schema_version": 1}, sort_keys=True)
    raw = to_bytes(tensors, metadata={"repskip": about})
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def save(path: Path, maps: dict[int, np.ndarray], method: str = "linear") -> str:
    """Write the maps (atomically) and return the file's hash."""
    raw, digest = serialize(maps, method)
    write_atomic(Path(path), raw)
    return digest


def load(path: Path, expected_hash: str, anchors: list[int], hidden: int) -> dict[int, np.ndarray]:
    """The maps of a recipe, checked: the file exists, its hash is the recipe's, and it holds
    exactly one [hidden, hidden] map per anchor."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise RepskipError(f"the recipe's repair maps {path} are missing; keep the file 'repskip analyze' wrote beside "
                           "the recipe, or re-run it")
    found = sha256(path)
    if found != expected_hash:
        raise RepskipError(f"repair file {path} has hash {found[:19]}..., not the recipe's {expected_hash[:19]}...: "
                           "it belongs to another recipe; re-run 'repskip analyze' to make both together")
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = set(f.keys())
            wanted = {_key(a) for a in anchors}
            if names != wanted:
                odd = sorted(names ^ wanted)[0]
                raise RepskipError(f"repair file {path} does not hold the recipe's maps ({odd}); re-run 'repskip analyze'")
            maps = {a: f.get_tensor(_key(a)).astype(np.float64) for a in anchors}
    except SafetensorError as exc:
        raise RepskipError(f"repair file {path} is not readable safetensors ({exc}); re-run 'repskip analyze'") from None
    for a, t in maps.items():
        if t.shape != (hidden, hidden):
            raise RepskipError(f"repair map for layer {a} in {path} is {list(t.shape)}, not [{hidden}, {hidden}]: "
                               "it was made for another model")
    return maps
