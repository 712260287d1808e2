"""The two models verify compares: loaded (a recipe applied in memory where one is given),
tagged for their caches, and checked to be a model and a compressed copy of it."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.model import ModelHandle
from ..errors import RepskipError


@dataclass
class Side:
    label: str
    handle: ModelHandle
    model: Any
    tokenizer: Any
    tag: str  # names its cache: the model fingerprint, plus the in-memory removal if any
    layers: int
    removed: list[int]


def load_side(label: str, handle: ModelHandle, dtype: str | None, device: str, remove: Sequence[int] = (),
              device_map: str | None = None, provider: str = "auto", maps: dict | None = None,
              offload_folder: Path | None = None, max_memory: int | None = None) -> Side:
    """One model of the comparison; ``remove`` and the repair ``maps`` (anchor layer -> T)
    apply a recipe in memory."""
    fam = handle.family
    big = {"offload_folder": offload_folder, "max_memory": max_memory} if device_map else {}
    model = handle.load(dtype, device, device_map=device_map, provider=provider, **big)
    layers = handle.num_layers
    tag = (onnx_tag(handle.path) if handle.onnx else handle.ckpt.fingerprint().replace("sha256:", "")[:16])
    if maps:
        from ..repair.fit import fold_in_memory
        from ..repair.store import serialize

        fold_in_memory(model, fam, maps)
        tag += "-repair" + serialize(maps)[1].replace("sha256:", "")[:8]
    if remove:
        kept = [i for i in range(layers) if i not in set(remove)]
        fam.remove_layers(model, kept)
        tag += "-skip" + "_".join(map(str, remove))
        layers = len(kept)
    return Side(label, handle, model, fam.load_tokenizer(handle.path), tag, layers, list(remove))


def side_cost(side: Side) -> Any:
    """What a side computes (repskip.flops.ModelCost): its checkpoint's layers, less those it
    removes in memory."""
    cost = side.handle.family.cost(side.handle.ckpt.config)
    gone = set(side.removed)
    return cost.keep([i for i in range(cost.num_layers) if i not in gone])


def onnx_tag(path: Path) -> str:
    """Cache tag of an ONNX export: its export record (recipe, parity, versions) and file size."""
    from ..formats import META_FILE, ONNX_FILE

    digest = hashlib.sha256()
    for name in (META_FILE, "config.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    digest.update(str((path / ONNX_FILE).stat().st_size).encode())
    return "onnx-" + digest.hexdigest()[:16]


def check_made_from(base: ModelHandle, compressed: ModelHandle) -> None:
    """Warn when the compressed model does not say it was made from ``base``: its recipe
    records the fingerprint of the model it was cut from."""
    from ..compress.files import RECIPE_NAME
    from ..recipe import load as load_recipe

    recipe_file = compressed.path / RECIPE_NAME
    if not recipe_file.is_file():
        warnings.warn(f"{compressed.path} carries no {RECIPE_NAME}: nothing says it was made from {base.path}; "
                      "retention compares two models only if one is a compressed copy of the other", stacklevel=2)
        return
    try:
        made = load_recipe(recipe_file).resolved
    except RepskipError as exc:
        warnings.warn(f"cannot tell what {compressed.path} was made from ({exc})", stacklevel=2)
        return
    origin = made.model if made else None
    if origin is not None and origin.fingerprint != base.ckpt.fingerprint():
        warnings.warn(f"{compressed.path} was made from another model ({origin.name_or_path or origin.fingerprint}) "
                      f"than {base.path}: the retention figures compare unrelated models", stacklevel=2)


def check_same_tokenizer(a: Side, b: Side) -> None:
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise RepskipError(
            f"base and compressed use different tokenizers ({a.handle.path} vs {b.handle.path}); "
            "verify compares a model with a compressed copy of itself"
        )
