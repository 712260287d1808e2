"""config.json for a model that keeps some of its decoder layers, each behaving as before.

Config fields describe layers in three ways: one entry per layer (``layer_types``,
``mlp_layer_types``, ``layers_block_type``, ``no_rope_layers``: sliced), lists of layer
indices (``mlp_only_layers``, ``full_attn_idxs``: renumbered), and rules by position
(``first_k_dense_replace``, ``decoder_sparse_step``, a period and an offset: rewritten into a
form that holds the kept layers, where the config class has one). The result is then checked
against what transformers builds from it: every kept layer must come out with the classes,
shapes and settings it had (layout.layer_signature). A removal no field can express is
refused before anything is written, naming the fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from repskip.consistency import layer_ranges
from repskip.errors import RepskipError

from . import layout as _layout
from .cost import LINEAR_ATTENTION

# "the first N layers are X": N becomes the number of kept layers below N
PREFIX_COUNTS = ("first_k_dense_replace", "num_dense_layers", "max_window_layers", "num_dense_blocks")
# lists of layer indices: kept ones renumbered, removed ones dropped
INDEX_LISTS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "attn_layer_indices", "hybrid_layer_ids",
               "index_layers", "local_layer_ids", "ple_layer_ids")
# one entry per layer whose values are layer indices: sliced, then renumbered
PER_LAYER_INDEX_LISTS = ("kv_source_layers",)
# per-layer lists a config class derives when config.json leaves them out, and accepts as input
DERIVED_PER_LAYER = ("layer_types", "mlp_layer_types")

# lists that may happen to hold one entry per layer without being about layers
NOT_PER_LAYER = frozenset({"architectures", "eos_token_id", "bos_token_id", "pad_token_id", "bad_words_ids",
                           "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "time_step_limit",
                           "stop_strings", "auto_map"})

# what looks like a field that describes layers by position, for naming it in a refusal
POSITIONAL = re.compile(r"layer|idx|indices|pattern|step|freq|period|offset|interval|first_k|every|block_type|types",
                        re.IGNORECASE)
NOT_POSITIONAL = re.compile(r"norm|eps|drop|dim$|size$|_heads?$|rope_theta|init|scale$|initializer|time_step",
                            re.IGNORECASE)


def _periodic_fit(flags: Sequence[bool]) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset) for every i, if one exists."""
    n = len(flags)
    for period in range(1, n + 1):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    if not any(flags):  # no layer of the kind: an offset past every layer
        return n + 1, n
    return None


class _Rewrite:
    def __init__(self, config: dict, kept: Sequence[int], num_layers: int, code: str | None):
        self.old, self.kept, self.n, self.code = config, list(kept), num_layers, code
        self.new = dict(config)
        self.pos = {old: new for new, old in enumerate(self.kept)}
        self.handled: set[str] = set()
        self.unexpressible: list[str] = []

    def set(self, key: str, value) -> None:
        self.new[key] = value
        self.handled.add(key)

    def run(self) -> dict:
        for key in _layout.count_keys(self.old, self.code):
            self.set(key, len(self.kept))
        for rule in RULES:
            rule(self)
        for key in PREFIX_COUNTS:
            value = self.old.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and key not in self.handled:
                self.set(key, sum(1 for i in self.kept if i < value))
        for key in INDEX_LISTS:
            values = self.old.get(key)
            if isinstance(values, list) and key not in self.handled and all(isinstance(v, int) for v in values):
                self.set(key, [self.pos[v] for v in values if v in self.pos])
        for key in PER_LAYER_INDEX_LISTS:
            values = self.old.get(key)
            if isinstance(values, list) and len(values) == self.n:
                lost = [i for i in self.kept if values[i] not in self.pos]
                if lost:
                    self.unexpressible.append(key)
                    continue
                self.set(key, [self.pos[values[i]] for i in self.kept])
        self._remap_layer_dicts()
        self._slice_per_layer()
        return self.new

    def _remap_layer_dicts(self) -> None:
        """Dicts keyed by layer index (Gemma 4's per_layer_config): kept keys renumbered."""
        for key, value in self.old.items():
            if key in self.handled or not isinstance(value, dict) or not value:
                continue
            keys = [str(k) for k in value]
            if all(k.isdigit() and int(k) < self.n for k in keys):
                self.set(key, {str(self.pos[int(k)]): v for k, v in value.items() if int(k) in self.pos})

    def _slice_per_layer(self) -> None:
        derived = _layout.build_config(self.old, self.code).to_dict()
        for key in DERIVED_PER_LAYER:
            if key not in self.old and isinstance(derived.get(key), list) and len(derived[key]) == self.n:
                self.set(key, [derived[key][i] for i in self.kept])
        for key, values in self.old.items():
            if key in self.handled or key in INDEX_LISTS or key in NOT_PER_LAYER or self.n < 2:
                continue
            if isinstance(values, list) and len(values) == self.n:
                self.set(key, [values[i] for i in self.kept])
            elif isinstance(values, str) and len(values) == self.n and POSITIONAL.search(key):
                self.set(key, "".join(values[i] for i in self.kept))  # a pattern string, a letter per layer


# --- rules for fields that describe layers by a rule, not a list -------------------------------
def _sparse_step(r: _Rewrite) -> None:
    """Qwen2-MoE and its kin: layer i is sparse iff (i+1) % decoder_sparse_step == 0 and i is
    not in mlp_only_layers. Any kept pattern is step 1 plus the dense layers listed."""
    step = r.old.get("decoder_sparse_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return
    only = set(r.old.get("mlp_only_layers") or [])
    dense = [i for i in r.kept if i in only or (i + 1) % step != 0]
    r.set("decoder_sparse_step", 1)
    r.set("mlp_only_layers", [r.pos[i] for i in dense])


def _period_offset(period_key: str, offset_key: str) -> Callable[[_Rewrite], None]:
    """Jamba / Zamba: layer i is of a kind iff i % period == offset; refit both to the kept layers."""
    def rule(r: _Rewrite) -> None:
        period, offset = r.old.get(period_key), r.old.get(offset_key)
        if not (isinstance(period, int) and isinstance(offset, int)) or period < 1:
            return
        fit = _periodic_fit([i % period == offset for i in r.kept])
        if fit is None:
            r.unexpressible.append(f"{period_key}/{offset_key}")
            return
        r.set(period_key, fit[0])
        r.set(offset_key, fit[1])

    return rule


def _attention_types(r: _Rewrite) -> None:
    """GPT-Neo: attention_types is a run-length list [[kinds, repeats], ...] of the layers' kinds."""
    spec = r.old.get("attention_types")
    if not isinstance(spec, list):
        return
    kinds: list[str] = []
    for item in spec:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) and isinstance(item[1], int)):
            return
        kinds += list(item[0]) * item[1]
    if len(kinds) != r.n:
        return
    r.set("attention_types", [[[kinds[i]], 1] for i in r.kept])
    r.handled.add("attention_layers")
    r.new.pop("attention_layers", None)  # derived from attention_types on load


def _cyclic(key: str) -> Callable[[_Rewrite], None]:
    """RecurrentGemma: layer i is of kind block_types[i % len(block_types)]; the kept kinds,
    listed in full, are a cycle of their own length."""
    def rule(r: _Rewrite) -> None:
        values = r.old.get(key)
        if not isinstance(values, list) or not values or len(values) == r.n:
            return
        r.set(key, [values[i % len(values)] for i in r.kept])

    return rule


def _window(start_key: str, end_key: str, interval_key: str) -> Callable[[_Rewrite], None]:
    """ERNIE 4.5 MoE: layer i is sparse iff start <= i <= end and (i + 1) % interval == 0; find
    a start, end and interval that select the kept sparse layers."""
    def rule(r: _Rewrite) -> None:
        start, end, interval = (r.old.get(k) for k in (start_key, end_key, interval_key))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, interval)) or interval < 1:
            return
        flags = [start <= i <= end and (i + 1) % interval == 0 for i in r.kept]
        m = len(flags)
        for step in range(1, m + 1):
            for lo in range(m + 1):
                for hi in range(lo - 1, m):
                    if all(f == (lo <= j <= hi and (j + 1) % step == 0) for j, f in enumerate(flags)):
                        r.set(start_key, lo)
                        r.set(end_key, hi)
                        r.set(interval_key, step)
                        return
        r.unexpressible.append(f"{start_key}/{end_key}/{interval_key}")

    return rule


def _depth_scaled(key: str) -> Callable[[_Rewrite], None]:
    """MiniCPM: each layer scales its residual branches by scale_depth / sqrt(layers); keep
    the product as it was for the shorter stack."""
    def rule(r: _Rewrite) -> None:
        value = r.old.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            r.set(key, value * math.sqrt(len(r.kept) / r.n))

    return rule


RULES: tuple[Callable[[_Rewrite], None], ...] = (
    _sparse_step,
    _period_offset("attn_layer_period", "attn_layer_offset"),
    _period_offset("expert_layer_period", "expert_layer_offset"),
    _attention_types,
    _cyclic("block_types"),
    _window("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
    _depth_scaled("scale_depth"),
)

# Settings a layer reads at run time together with its index: no config rewrite keeps such
# a layer as it was once it moves.
INDEX_SCALED = {"scale_attn_by_inverse_layer_idx": "scales each layer's attention by 1 / (its index + 1)"}


def positional_fields(config: dict) -> list[str]:
    return sorted(k for k, v in config.items()
                  if POSITIONAL.search(k) and not NOT_POSITIONAL.search(k) and isinstance(v, (int, list, str))
                  and not isinstance(v, bool))


def rewrite(config: dict, kept: Sequence[int], code: str | None = None) -> dict:
    """config.json for the model keeping layers ``kept`` (old indices, in order), checked to
    build every kept layer as it was; RepskipError naming the fields otherwise. ``code``: the
    trusted folder of a checkpoint with its own modeling code."""
    num_layers = _layout.count_of(config, code)
    kept = list(kept)
    removed = [i for i in range(num_layers) if i not in set(kept)]
    what = f"cannot remove layers {layer_ranges(removed)} of this {config.get('model_type')} model"
    if not removed:
        return dict(config)
    for key, why in INDEX_SCALED.items():
        if config.get(key):
            raise RepskipError(f"{what}: config.json {key} is set, which {why}; no config can keep the "
                               "kept layers as they were")
    signatures = [_layout.layout(config, code).signature(i) for i in range(num_layers)]
    attending = [i for i in range(num_layers) if _attends(signatures[i])]
    if attending and not set(attending) & set(kept):
        raise RepskipError(f"{what}: that removes every attention layer ({layer_ranges(attending)}) of this hybrid, "
                           "and transformers cannot run it without one; keep at least one")
    r = _Rewrite(config, kept, num_layers, code)
    new = r.run()
    if r.unexpressible:
        raise RepskipError(f"{what}: config.json {', '.join(r.unexpressible)} cannot describe the kept layers "
                           "(no period and offset select them); choose other layers")
    problem = difference(config, new, kept, code)
    if problem:
        unhandled = [k for k in positional_fields(config) if k not in r.handled]
        if unhandled:
            raise RepskipError(f"{what}: {problem}, and config.json {', '.join(unhandled)} cannot express the kept "
                               "layers otherwise; choose other layers")
        raise RepskipError(f"{what}: {problem}; no config.json field sets it (the layer derives it from its own "
                           "index), so a kept layer cannot move")
    return new


def _attends(signature: dict) -> bool:
    """Whether a layer holds softmax attention (a module class named *Attention, not a linear one)."""
    return any(entry["class"].endswith("Attention") and not LINEAR_ATTENTION.search(entry["class"])
               for entry in signature.values())


def difference(old_config: dict, new_config: dict, kept: Sequence[int], code: str | None = None) -> str | None:
    """How the model transformers builds from ``new_config`` differs from ``old_config``'s with
    only the ``kept`` layers, in words; None when every kept layer and every other tensor
    comes out as it was."""
    old = _layout.layout(old_config, code)
    try:
        new = _layout.layout(new_config, code)
    except RepskipError as exc:
        return f"transformers refuses the rewritten config ({exc})"
    if new.num_layers != len(kept):
        return f"the rewritten config builds {new.num_layers} layers instead of {len(kept)}"
    for j, i in enumerate(kept):
        diff = _layout.signature_difference(old.signature(i), new.signature(j), i, j, kept, old.num_layers)
        if diff:
            return f"kept layer {i} (layer {j} after removal) would change: {diff}"
    outside_old = {n: s for n, s in old.saved.items() if not n.startswith(old.prefix)}
    outside_new = {n: s for n, s in new.saved.items() if not n.startswith(new.prefix)}
    if outside_old != outside_new:
        changed = sorted(set(outside_old.items()) ^ set(outside_new.items()))
        return f"the tensors outside the layers would change (first: {changed[0][0]})"
    return None
