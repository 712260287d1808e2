"""A causal decoder's layout, read from the model transformers builds for its config.

Built on the meta device, a model costs no memory and no weights, yet its modules say
everything layer removal needs: which ModuleList holds the decoder layers, every tensor's
name and shape (as ``save_pretrained`` writes them: tied copies dropped, the checkpoint
conversions transformers applies on load reverted), and what each layer is (its module
classes, shapes and settings), so that a rewritten config can be checked to build every kept
layer as it was. Nothing here is a table of architectures.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from repskip.errors import RepskipError

# Every config class answers the layer count under this attribute; its attribute_map says
# which config.json key holds it (GPT-2's n_layer, MPT's n_layers).
COUNT_ATTRIBUTE = "num_hidden_layers"

# Attributes of a module that number the layer it sits in: they differ between a layer and
# the same layer renumbered, and say nothing about what it computes.
INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})

# Composite configs (a language model inside a vision or audio model) hold these.
SUB_CONFIG_KEYS = ("text_config", "vision_config", "audio_config", "encoder_config", "decoder_config")


def _quiet():
    """transformers warns about defaults it fills in; a layout read is not the place for that."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    return verbosity


def config_class(model_type: str) -> Any | None:
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def remote_classes(config: dict, code: str | None) -> tuple[Any, Any] | None:
    """(config class, causal-LM class) from the checkpoint's own code, where it ships some
    (``auto_map``) and ``code`` (its folder) is given: only with --trust-remote-code."""
    auto = config.get("auto_map") if code else None
    if not isinstance(auto, dict) or "AutoConfig" not in auto or "AutoModelForCausalLM" not in auto:
        return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return (get_class_from_dynamic_module(auto["AutoConfig"], code),
                get_class_from_dynamic_module(auto["AutoModelForCausalLM"], code))
    except Exception as exc:  # the checkpoint's code failed to import
        raise RepskipError(f"the code this checkpoint ships could not be loaded ({type(exc).__name__}: {exc})"
                           .splitlines()[0]) from None


def causal_lm_class_name(model_type: str) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def kind_problem(config: dict, code: str | None = None) -> str | None:
    """Why transformers' causal-LM classes (or, trusted, the checkpoint's own) cannot serve
    this config as a decoder-only model, in words fit for an error; None when they can."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return "config.json names no model_type"
    auto = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if code and "AutoModelForCausalLM" in auto:
        return None  # trusted: the checkpoint's own causal LM
    if config_class(model_type) is None:
        if "AutoModelForCausalLM" in auto:
            return (f"model_type {model_type!r} is not known to the installed transformers and the checkpoint ships "
                    "its own code for it (auto_map): pass --trust-remote-code if you trust that code")
        return f"model_type {model_type!r} is not known to the installed transformers (a newer one may know it)"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if config.get("is_encoder_decoder") or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return f"model_type {model_type!r} is an encoder-decoder model; repskip removes layers of decoder-only causal LMs"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return f"model_type {model_type!r} is an encoder (bidirectional, masked LM); repskip removes layers of decoder-only causal LMs"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"model_type {model_type!r} has no causal-LM class in transformers; repskip removes layers of decoder-only causal LMs"
    nested = [k for k in SUB_CONFIG_KEYS if isinstance(config.get(k), dict)]
    if nested:
        return (f"model_type {model_type!r} wraps other models ({', '.join(nested)}); pass a checkpoint of its "
                "text model alone (for example the *_text model type)")
    return None


def build_config(config: dict, code: str | None = None) -> Any:
    """transformers' config object for a config.json dict (the checkpoint's own class where
    ``code``, its trusted folder, is given and it ships one)."""
    remote = remote_classes(config, code)
    cls = remote[0] if remote else config_class(config.get("model_type", ""))
    if cls is None:
        raise RepskipError(kind_problem(config) or "unknown model_type")
    verbosity = _quiet()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_dict(cls._decode_special_floats(dict(config)))
    except Exception as exc:  # transformers validates configs with many exception types
        raise RepskipError(f"transformers refuses this config.json ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    finally:
        import transformers

        transformers.logging.set_verbosity(verbosity)


def meta_model(config: dict, code: str | None = None) -> Any:
    """The causal LM transformers builds for ``config``, on the meta device (no memory)."""
    return _meta_model(json.dumps(config, sort_keys=True, default=str), code)


def fresh_meta_model(config: dict, code: str | None = None) -> Any:
    """As :func:`meta_model`, a new one each call (one to change, as training does)."""
    return _meta_model.__wrapped__(json.dumps(config, sort_keys=True, default=str), code)


@functools.lru_cache(maxsize=8)
def _meta_model(config_json: str, code: str | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads(config_json)
    cfg = build_config(config, code)
    remote = remote_classes(config, code)
    verbosity = _quiet()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = remote[1](cfg) if remote else AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except RepskipError:
        raise
    except Exception as exc:
        raise RepskipError(
            f"transformers cannot build a {cfg.model_type} model from this config.json "
            f"({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None
    finally:
        import transformers

        transformers.logging.set_verbosity(verbosity)
    return model.eval()


def layers_path(model: Any, num_layers: int) -> str:
    """The dotted path of the ModuleList of decoder layers."""
    import torch

    base_prefix = getattr(model, "base_model_prefix", "") or ""
    plan = getattr(model.config, "base_model_pp_plan", None) or {}
    if "layers" in plan and base_prefix:
        candidate = f"{base_prefix}.layers"
        module = _get(model, candidate)
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return candidate
    lists = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers and name
             and all(type(x).__name__ != "Linear" for x in m)]
    if base_prefix:  # the language model's own stack, not a vision tower's
        inside = [n for n in lists if n.startswith(base_prefix + ".")]
        lists = inside or lists
    top = [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n)]
    if len(top) != 1:
        found = ", ".join(top) or "none"
        raise RepskipError(
            f"cannot tell which module list holds the {num_layers} decoder layers of this "
            f"{model.config.model_type} model (candidates: {found})"
        )
    return top[0]


def _get(root: Any, path: str) -> Any:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _simple(value: Any) -> bool:
    """A setting a layer's signature compares: a number, a string, or a short list of them
    (maps a module derives from them, such as Zamba 2's layer_dic, are left to the settings
    they come from)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return len(value) <= 64 and all(_simple(v) for v in value)
    return False


def plain(value: Any) -> bool:
    """A setting made of numbers, strings and containers of them (no tensor, module or object)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(plain(k) and plain(v) for k, v in value.items())
    return False


def layer_signature(layer: Any) -> dict[str, Any]:
    """What a decoder layer computes, as far as its modules say: every submodule's class,
    its parameters' and buffers' shapes and its plain settings (window sizes, attention
    kinds, flags). The layer's index is left out."""
    out: dict[str, Any] = {}
    for name, module in layer.named_modules():
        entry: dict[str, Any] = {"class": type(module).__name__}
        entry["params"] = {n: _shape(p) for n, p in module.named_parameters(recurse=False)}
        entry["buffers"] = {n: _shape(b) for n, b in module.named_buffers(recurse=False)}
        settings = {}
        for key, value in vars(module).items():
            if key.startswith("_") or key in ("training",) or key in INDEX_ATTRIBUTES:
                continue
            if _simple(value):
                settings[key] = list(value) if isinstance(value, tuple) else value
        entry["settings"] = settings
        out[name or "."] = entry
    return out


def signature_difference(old: dict[str, Any], new: dict[str, Any], old_index: int, new_index: int,
                         kept: Sequence[int] = (), num_layers: int | None = None) -> str | None:
    """The first way ``new`` (a layer at ``new_index``, one of the ``kept`` layers of
    ``num_layers``) differs from ``old`` (at ``old_index``), in words; None when it is the
    same layer. Settings that describe the stack rather than the layer follow it and are no
    difference: the layer's own index, the layer count, a per-layer list the layer keeps a copy
    of (GPT-Neo's attention_layers) sliced to the kept layers, and a list of layer indices
    (Zamba 2's layer_block_map) renumbered to them."""
    for name in sorted(set(old) | set(new)):
        where = "the layer" if name == "." else name
        if name not in new:
            return f"{where} is missing"
        if name not in old:
            return f"{where} is new"
        a, b = old[name], new[name]
        if a["class"] != b["class"]:
            return f"{where} is a {b['class']} instead of a {a['class']}"
        for part in ("params", "buffers"):
            if a[part] != b[part]:
                return f"{where} has {part} {b[part]} instead of {a[part]}"
        for key in sorted(set(a["settings"]) | set(b["settings"])):
            x, y = a["settings"].get(key), b["settings"].get(key)
            if x == y or (x == old_index and y == new_index) or _close(x, y):
                continue
            if kept and _follows_the_stack(x, y, list(kept), num_layers):
                continue
            return f"{where}.{key} is {y!r} instead of {x!r}"
    return None


def _close(x: Any, y: Any) -> bool:
    """Floats equal but for the last bits (a scale recomputed for the new depth)."""
    return isinstance(x, float) and isinstance(y, float) and abs(x - y) <= 1e-12 * max(abs(x), abs(y))


def _follows_the_stack(x: Any, y: Any, kept: list[int], num_layers: int | None) -> bool:
    """Whether setting ``y`` is setting ``x`` of a stack that kept only ``kept`` layers."""
    if num_layers is not None and x == num_layers and y == len(kept):
        return True
    if not (isinstance(x, list) and isinstance(y, list)):
        return False
    if len(x) > max(kept) and y == [x[i] for i in kept]:  # one entry per layer
        return True
    position = {old: new for new, old in enumerate(kept)}
    return all(isinstance(v, int) and not isinstance(v, bool) for v in x) \
        and y == [position[v] for v in x if v in position]  # layer indices


@dataclass(frozen=True)
class Layout:
    """What a checkpoint of one config holds and where its decoder layers are."""

    model_type: str
    architecture: str
    num_layers: int
    layers_path: str  # the decoder layers' ModuleList in the model
    prefix: str  # layer i's tensors on disk start with f"{prefix}{i}."
    saved: dict[str, tuple[int, ...]]  # as save_pretrained writes them
    native: dict[str, tuple[int, ...]]  # the model's own state-dict names (transformers loads both)
    tied: dict[str, str]  # tensor not saved -> the tensor it is tied to
    ignored: tuple[str, ...]  # patterns transformers ignores on load (_keys_to_ignore_on_load_unexpected)
    signatures: tuple[str, ...]  # per layer, JSON of layer_signature

    def signature(self, index: int) -> dict[str, Any]:
        return json.loads(self.signatures[index])

    def is_ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignored)


def count_of(config: dict, code: str | None = None) -> int:
    """The number of decoder layers config.json declares, under whichever key its config
    class reads."""
    cfg = build_config(config, code)
    value = getattr(cfg, COUNT_ATTRIBUTE, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RepskipError(f"config.json of this {config.get('model_type')} model declares no layer count")
    return value


def count_keys(config: dict, code: str | None = None) -> list[str]:
    """The config.json keys holding the layer count (the name its config class reads, and
    the usual alias where both are written)."""
    remote = remote_classes(config, code)
    cls = remote[0] if remote else config_class(config.get("model_type", ""))
    alias = (getattr(cls, "attribute_map", None) or {}).get(COUNT_ATTRIBUTE, COUNT_ATTRIBUTE)
    return [k for k in dict.fromkeys((alias, COUNT_ATTRIBUTE)) if k in config] or [alias]


def layout(config: dict, code: str | None = None) -> Layout:
    """The layout of ``config``'s model (cached: building it is cheap, yet not free); ``code``:
    the trusted folder of a checkpoint that ships its own modeling code."""
    return _layout(json.dumps(config, sort_keys=True, default=str), code)


@functools.lru_cache(maxsize=16)
def _layout(config_json: str, code: str | None) -> Layout:
    config = json.loads(config_json)
    problem = kind_problem(config, code)
    if problem:
        raise RepskipError(problem)
    model = meta_model(config, code)
    num_layers = int(getattr(model.config, COUNT_ATTRIBUTE))
    path = layers_path(model, num_layers)
    layers = _get(model, path)
    native = {n: _shape(t) for n, t in model.state_dict().items()}
    saved, tied = _saved_tensors(model)
    prefix = _disk_prefix(saved, path, num_layers)
    signatures = tuple(json.dumps(layer_signature(layer), sort_keys=True) for layer in layers)
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return Layout(
        model_type=config["model_type"], architecture=type(model).__name__, num_layers=num_layers,
        layers_path=path, prefix=prefix, saved=saved, native=native, tied=tied, ignored=ignored,
        signatures=signatures,
    )


def _saved_tensors(model: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names and shapes as ``save_pretrained`` writes them, and the tied tensors it leaves out."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    tied_to = dict(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {})
    tied = {name: tied_to.get(name, "") for name in state if name not in kept}
    try:
        reverted = revert_weight_conversion(model, kept)
    except Exception as exc:  # a conversion that cannot run on meta tensors
        raise RepskipError(
            f"cannot work out the on-disk tensor names of a {model.config.model_type} model "
            f"({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None
    return {n: _shape(t) for n, t in reverted.items()}, tied


def _disk_prefix(saved: dict[str, tuple[int, ...]], path: str, num_layers: int) -> str:
    """The tensor-name prefix of the layers on disk: the module path, unless the checkpoint
    conversion renames it, in which case the one prefix whose indices run 0..L-1."""
    def covers(prefix: str) -> bool:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for n in saved if (m := pattern.match(n))}
        return found == set(range(num_layers))

    if covers(path + "."):
        return path + "."
    candidates = {m.group(1) for n in saved if (m := re.match(r"(.*?\.)\d+\.", n))}
    good = sorted(p for p in candidates if covers(p))
    if len(good) != 1:
        raise RepskipError(f"cannot find the decoder layers among the tensor names (module path {path})")
    return good[0]
