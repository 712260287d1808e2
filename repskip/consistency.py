"""Refusing a checkpoint whose config.json and weights disagree, before any work starts.

Generic checks hold for every family (layer indices, the same tensors in every layer); a
family that implements ``Family.expected_tensors`` also gets every tensor's name and shape
checked. Works on the config dict and the safetensors headers only: no weight data is read,
and torch is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from .checkpoint import Checkpoint
from .errors import RepskipError
from .family import Family

#: The fix named by every refusal of an inconsistent checkpoint.
CONSISTENCY_FIX = "fix config.json, or re-download / re-convert the checkpoint"

# Config keys that commonly hold the layer count, for naming it in a message.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")


def _show(name: str) -> str:
    """A tensor or file name fit for a one-line message."""
    return name if name.isprintable() else repr(name)


def layer_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _config_problem(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"config.json has no {exc.args[0]!r} key" if exc.args else "config.json lacks a key"
    return f"config.json holds an unusable value ({type(exc).__name__}: {exc})".splitlines()[0]


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _sources(shape: Sequence[int]) -> str:
    names = [getattr(d, "source", None) for d in shape]
    if not names or not all(names):
        return ""
    return " (" + " x ".join(names) + ")"


def check_checkpoint(ckpt: Checkpoint, family: Family, family_name: str | None = None) -> None:
    """Refuse a checkpoint whose config.json and weights disagree, before any work starts.

    Generic checks, for every family: the layer indices among the tensor names (``layer_prefix``
    + ``{i}.``) are exactly ``0..num_layers-1``, and every layer holds the same tensor
    suffixes. Then, where the family implements ``expected_tensors``: every expected tensor is
    present with its shape, and nothing else is there but ``optional_tensors``. Works on the
    config dict and the safetensors headers only: no weight data is read, torch is not needed.
    Each refusal is a one-line RepskipError naming the folder, the first mismatch and the fix.
    """
    path, config, tensors = ckpt.path, ckpt.config, ckpt.tensors
    label = family_name or type(family).__name__

    def refuse(problem: str, more: int = 0) -> RepskipError:
        extra = f" (and {more} more mismatch{'es' if more > 1 else ''})" if more else ""
        return RepskipError(f"{path}: {problem}{extra}; {CONSISTENCY_FIX}")

    # 1. the layers: indices 0..L-1, each with the same tensors
    try:
        declared = int(family.num_layers(config))
        prefix = family.layer_prefix(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise RepskipError(
            f"{path}: {_config_problem(exc)}, so the number of layers of this {label} checkpoint is "
            f"unknown; {CONSISTENCY_FIX}"
        ) from None
    layers: dict[int, set[str]] = {}
    for name in tensors:
        if not name.startswith(prefix):
            continue
        index, dot, rest = name[len(prefix):].partition(".")
        if not (index.isascii() and index.isdigit() and str(int(index)) == index and dot and rest):
            raise refuse(f"tensor {_show(name)} lies under the layer prefix {prefix} but names no layer index")
        layers.setdefault(int(index), set()).add(rest)
    if sorted(layers) != list(range(declared)):
        key = next((k for k in LAYER_COUNT_KEYS if config.get(k) == declared), None)
        held = f"layers {layer_ranges(list(layers))}" if layers else "no layers"
        if layers and len(layers) == 1:
            held = f"layer {layer_ranges(list(layers))} only"
        raise refuse(
            f"config.json declares {declared} layer{'s' if declared != 1 else ''}"
            f"{f' ({key})' if key else ''} but the weights hold {held}"
        )
    # 2. the family's own layout, where it gives one; else every layer must hold the same tensors
    try:
        layouts = family.tensor_layouts(config)
        optional = (family.optional_tensors(config) or {}) if layouts else {}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise RepskipError(
            f"{path}: {_config_problem(exc)}, so the tensors of this {label} checkpoint cannot be "
            f"checked; {CONSISTENCY_FIX}"
        ) from None
    if layouts:  # layers may differ (dense and mixture-of-experts layers, attention and state-space ones)
        found = [_layout_problems(ckpt, family, label, expected, optional) for expected in layouts]
        problems = min(found, key=len)  # the layout the checkpoint is written in
        if problems:
            name, message = problems[0]
            raise refuse(_with_sources(message, family, config, name), len(problems) - 1)
        return
    counts: dict[str, int] = {}
    for suffixes in layers.values():
        for suffix in suffixes:
            counts[suffix] = counts.get(suffix, 0) + 1
    for suffix in sorted(s for s, n in counts.items() if n != declared):
        holders = sorted(i for i, held_by in layers.items() if suffix in held_by)
        if 2 * len(holders) > declared:  # most layers hold it: the others miss it
            lacking = sorted(set(layers) - set(holders))
            raise refuse(
                f"tensor {_show(f'{prefix}{lacking[0]}.{suffix}')} is missing, though "
                f"{len(holders)} of the {declared} layers hold {_show(suffix)}"
            )
        raise refuse(
            f"tensor {_show(f'{prefix}{holders[0]}.{suffix}')} has no counterpart in the other layers "
            f"({_show(suffix)} is in {len(holders)} of the {declared} layers)"
        )


def _layout_problems(ckpt: Checkpoint, family: Family, label: str, expected: dict,
                     optional: dict) -> list[tuple[str, str]]:
    """(tensor, what is wrong with it) for every way the checkpoint departs from ``expected``."""
    config, tensors = ckpt.config, ckpt.tensors
    problems: list[tuple[str, str]] = []
    for name, shape in expected.items():
        entry = tensors.get(name)
        if entry is None:
            problems.append((name, f"tensor {_show(name)} is missing, though config.json implies it"))
        elif tuple(entry.shape) != tuple(shape):
            problems.append((name, f"tensor {_show(name)} has shape {_shape(entry.shape)}; config.json implies "
                                   f"{_shape(shape)}{_sources(shape)}"))
    for name, entry in tensors.items():
        if name in expected:
            continue
        if name not in optional:
            if not family.tolerated_tensor(config, name):
                problems.append((name, f"tensor {_show(name)} is not part of the model config.json describes "
                                       f"({label} layout)"))
        elif optional[name] is not None and tuple(entry.shape) != tuple(optional[name]):
            shape = optional[name]
            problems.append((name, f"tensor {_show(name)} has shape {_shape(entry.shape)}; config.json implies "
                                   f"{_shape(shape)}{_sources(shape)}"))
    return problems


def _with_sources(message: str, family: Family, config: dict, name: str) -> str:
    """A shape mismatch named with the config keys its dimensions come from, where the
    family can tell them and the shape did not say."""
    if not message.endswith("]"):
        return message
    sources = family.shape_sources(config, name)
    return f"{message} ({' x '.join(sources)})" if sources and all(sources) else message
