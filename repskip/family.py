"""What a model family plugin must do, and how the core finds the family of a checkpoint.

A family is registered under the ``repskip.families`` entry-point group. The core knows no
family by name: it asks each registered family whether it recognises a config.json.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from . import registry
from .errors import RepskipError
from .flops import DecoderGeometry

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

GenerativeKind = Literal["autoregressive", "diffusion"]

#: The fix named by every refusal of an inconsistent checkpoint.
CONSISTENCY_FIX = "fix config.json, or re-download / re-convert the checkpoint"


class Dim(int):
    """A tensor dimension that remembers where in config.json it comes from.

    ``Dim(64, "hidden_size")`` or ``Dim(256, "num_key_value_heads*head_dim")`` is the int 64 or
    256 everywhere (shapes built from Dims compare equal to plain tuples); ``source`` lets a
    shape mismatch say which config key to fix.
    """

    source: str

    def __new__(cls, value: int, source: str) -> Dim:
        obj = super().__new__(cls, int(value))
        obj.source = source
        return obj

    def __getnewargs__(self) -> tuple[int, str]:
        return int(self), self.source

    def __repr__(self) -> str:
        return int.__repr__(self)

    __str__ = __repr__


class Family(abc.ABC):
    """A family of checkpoints that share an on-disk layout and a forward semantics.

    Subclasses set the class attributes and implement the abstract methods. Everything a
    family does with files works on the config dict; everything it does with a model works
    on the torch module its ``load`` returns.
    """

    #: Human-readable list of what the family covers, shown when nothing matches.
    supports: ClassVar[str] = ""
    #: "autoregressive" or "diffusion": decides samplers and analysis modes.
    generative_kind: ClassVar[GenerativeKind] = "autoregressive"
    #: Name of the sampler plugin used when the user names none.
    default_sampler: ClassVar[str] = "ar"

    # --- files -----------------------------------------------------------------------
    @abc.abstractmethod
    def matches(self, config: dict) -> bool:
        """Whether this family handles a checkpoint with this config.json."""

    @abc.abstractmethod
    def num_layers(self, config: dict) -> int:
        """Number of decoder layers the config declares."""

    @abc.abstractmethod
    def layer_prefix(self, config: dict) -> str:
        """Tensor-name prefix of the layers: layer i's tensors start with f"{prefix}{i}."."""

    @abc.abstractmethod
    def rewrite_config(self, config: dict, kept: Sequence[int]) -> dict:
        """A new config dict for a model that keeps only the layers ``kept`` (old indices)."""

    @abc.abstractmethod
    def geometry(self, config: dict) -> DecoderGeometry:
        """The shapes that decide compute, for the analytic FLOPs."""

    # --- models ----------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, path: Path, dtype: Any = None, device: str = "cpu", device_map: str | None = None) -> Any:
        """Load the model for inference (eval mode). ``dtype=None`` keeps the checkpoint's.
        ``device_map`` (e.g. "auto") spreads a model too big for one device, where the family
        can; a family that cannot raises RepskipError."""

    @abc.abstractmethod
    def load_tokenizer(self, path: Path) -> Any:
        """The tokenizer saved with the checkpoint."""

    @abc.abstractmethod
    def decoder_layers(self, model: Any) -> Any:
        """The ordered torch.nn.ModuleList of decoder layers."""

    @abc.abstractmethod
    def remove_layers(self, model: Any, kept: Sequence[int]) -> None:
        """Keep only ``kept`` layers, in place, leaving a model that runs (caches included)."""

    def logits(self, model: Any, input_ids: Any, attention_mask: Any) -> Any:
        """Logits of a forward pass; position i predicts token i+1 for autoregressive models."""
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def onnx_module(self, model: Any) -> Any:
        """A torch module with the ONNX signature of this family's kind, for export.

        Autoregressive: ``forward(input_ids, attention_mask, position_ids, past)`` where
        ``past`` is a tuple of 2 x layers tensors [batch, kv_heads, past_len, head_dim] (key,
        value per layer), returning ``(logits, *present)`` with the new token's keys and values
        appended. Diffusion: ``forward(input_ids, attention_mask)`` returning the logits as the
        family's own forward returns them. See repskip.runtime for the names each gets.
        """
        raise RepskipError(f"the {type(self).__name__} family plugin does not support ONNX export")

    @staticmethod
    def layer_output(output: Any) -> Any:
        """The hidden state a decoder layer returns (some return a tuple)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    # --- consistency of config.json and weights (optional) ------------------------------
    def expected_tensors(self, config: dict) -> dict[str, tuple[int, ...]] | None:
        """Every tensor a checkpoint with this config.json must hold, name -> shape, computed
        from the config alone; ``None`` (the default) when the family cannot say.

        When a dict is returned, opening a checkpoint refuses a tensor that is missing, one
        whose shape differs, and one that is neither here nor in ``optional_tensors``. Shape
        entries may be ``Dim``s (ints that name the config keys they come from) so that a
        mismatch names the key to fix. Raise ``KeyError`` for a config key that is missing.
        """
        return None

    def optional_tensors(self, config: dict) -> dict[str, tuple[int, ...] | None]:
        """Tensors that may be present or absent without changing the model (a tied
        ``lm_head.weight``, a legacy ``rotary_emb.inv_freq`` buffer the loader ignores): name ->
        the shape it must have when present, or ``None`` for any shape. Read only when
        ``expected_tensors`` returns a dict."""
        return {}


def slice_layer_config(
    config: dict, kept: Sequence[int], count_key: str, per_layer_keys: Sequence[str] = ("layer_types",)
) -> dict:
    """A config for the kept layers: the count updated, per-layer lists sliced, and
    ``max_window_layers`` (the number of leading full-attention layers) recomputed."""
    new = dict(config)
    total = int(config[count_key])
    new[count_key] = len(kept)
    for key in per_layer_keys:
        values = config.get(key)
        if isinstance(values, list):
            if len(values) != total:
                raise RepskipError(
                    f"config.json {key} has {len(values)} entries for {total} layers; "
                    "the checkpoint is inconsistent"
                )
            new[key] = [values[i] for i in kept]
    # Kept layers keep their order, so the new count is how many were below the old one.
    if isinstance(config.get("max_window_layers"), int):
        new["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    return new


def validate_kept(num_layers: int, removed: Sequence[int]) -> list[int]:
    """The kept layer indices for a removal list, with every misuse a clear error."""
    removed = list(removed)
    bad = [i for i in removed if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise RepskipError(f"layer indices must be integers, got {bad[0]!r}")
    out_of_range = sorted(i for i in removed if not 0 <= i < num_layers)
    if out_of_range:
        raise RepskipError(
            f"layer index {out_of_range[0]} is out of range: the model has {num_layers} layers "
            f"(valid indices 0..{num_layers - 1})"
        )
    seen: set[int] = set()
    dupes = sorted({i for i in removed if i in seen or seen.add(i)})
    if dupes:
        raise RepskipError(f"layer index {dupes[0]} is listed more than once in the removal list")
    kept = [i for i in range(num_layers) if i not in seen]
    if not kept:
        raise RepskipError(f"the recipe removes all {num_layers} layers; at least one must stay")
    return kept


def families() -> dict[str, Family]:
    """Instances of every registered family plugin, by entry-point name."""
    return {name: cls() for name, cls in registry.loaded("families").items()}


def find_family(config: dict, name: str | None = None) -> tuple[str, Family]:
    """The family that recognises ``config`` (or the one called ``name``)."""
    available = families()
    if name is not None:
        if name not in available:
            known = ", ".join(sorted(available)) or "none installed"
            raise RepskipError(f"unknown model family {name!r}; installed families: {known}")
        return name, available[name]
    for fam_name, fam in available.items():
        if fam.matches(config):
            return fam_name, fam
    arch = ", ".join(config.get("architectures") or []) or "?"
    supported = "; ".join(
        f"{n}: {f.supports}" if f.supports else n for n, f in sorted(available.items())
    ) or "no family plugins are installed"
    raise RepskipError(
        f"unsupported architecture (model_type {config.get('model_type')!r}, {arch}). "
        f"Supported: {supported}. To add one, write a family plugin (docs/plugins.md)"
    )


# --- consistency of config.json and weights ------------------------------------------------
# Config keys that commonly hold the layer count, for naming it in a message.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")


def _show(name: str) -> str:
    """A tensor or file name fit for a one-line message."""
    return name if name.isprintable() else repr(name)


def _layer_ranges(indices: Sequence[int]) -> str:
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
        held = f"layers {_layer_ranges(list(layers))}" if layers else "no layers"
        if layers and len(layers) == 1:
            held = f"layer {_layer_ranges(list(layers))} only"
        raise refuse(
            f"config.json declares {declared} layer{'s' if declared != 1 else ''}"
            f"{f' ({key})' if key else ''} but the weights hold {held}"
        )
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

    # 2. the family's own layout, where it gives one
    try:
        expected = family.expected_tensors(config)
        optional = (family.optional_tensors(config) or {}) if expected is not None else {}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise RepskipError(
            f"{path}: {_config_problem(exc)}, so the tensors of this {label} checkpoint cannot be "
            f"checked; {CONSISTENCY_FIX}"
        ) from None
    if expected is None:
        return
    problems: list[str] = []
    for name, shape in expected.items():
        entry = tensors.get(name)
        if entry is None:
            problems.append(f"tensor {_show(name)} is missing, though config.json implies it")
        elif tuple(entry.shape) != tuple(shape):
            problems.append(
                f"tensor {_show(name)} has shape {_shape(entry.shape)}; config.json implies "
                f"{_shape(shape)}{_sources(shape)}"
            )
    for name, entry in tensors.items():
        if name in expected:
            continue
        if name not in optional:
            problems.append(f"tensor {_show(name)} is not part of the model config.json describes ({label} layout)")
        elif optional[name] is not None and tuple(entry.shape) != tuple(optional[name]):
            shape = optional[name]
            problems.append(
                f"tensor {_show(name)} has shape {_shape(entry.shape)}; config.json implies "
                f"{_shape(shape)}{_sources(shape)}"
            )
    if problems:
        raise refuse(problems[0], len(problems) - 1)
