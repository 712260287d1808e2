"""genai_config.json: what onnxruntime-genai needs to run an autoregressive ONNX export.

onnxruntime-genai (ONNX Runtime's generate() API) reads ``genai_config.json`` beside the graph:
the graph's input and output names, the shape of its KV cache, the special tokens and the
default search. It sizes every layer's cache from one head count and one head size, so a graph
whose layers cache keys and values of different shapes cannot be described, and it generates
left to right on a KV cache, so a diffusion export cannot be described either. In both cases
no file is written and the reason is recorded in the export's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import RepskipError
from ..formats import ONNX_FILE

GENAI_FILE = "genai_config.json"
# The type onnxruntime-genai runs a plain decoder-only graph under (its list of language model
# types has "decoder" beside the named architectures its own builder writes).
MODEL_TYPE = "decoder"
# A generation_config.json holds only what differs from transformers' defaults, so a value
# it leaves out means these.
TRANSFORMERS_SEARCH = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}

KVShapes = Sequence[tuple[tuple[int, int], tuple[int, int]]]


def genai_config(config: dict, family: Any, source: Path, kv_shapes: KVShapes | None) -> tuple[dict | None, str | None]:
    """The genai_config.json of an export, or None and the reason there is none.

    ``config`` is the exported (pruned) config.json, ``family`` its family plugin, ``source``
    the folder whose generation_config.json and tokenizer give the special tokens and the
    search defaults, and ``kv_shapes`` the graph's cache per kept layer: ((key heads, key head
    size), (value heads, value head size)), as the export module's ``kv_shapes`` gives it.
    """
    if family.generative_kind != "autoregressive":
        return None, ("a diffusion model denoises the whole sequence at every step; onnxruntime-genai "
                      "generates left to right on a KV cache and has no masked-diffusion loop")
    if not kv_shapes:
        return None, "the graph has no KV cache"
    shapes = sorted({(int(h), int(d)) for layer in kv_shapes for h, d in layer})
    if len(shapes) != 1:
        seen = ", ".join(f"{h}x{d}" for h, d in shapes)
        return None, (f"the cached keys and values differ in shape between layers or between keys and values "
                      f"(heads x head size: {seen}); genai_config.json gives one head count and one head size "
                      "for every layer")
    (kv_heads, head_size), = shapes
    context = family.context_length(config)
    if context is None:
        return None, "config.json gives no context length (max_position_embeddings)"
    generation = _read_json(Path(source) / "generation_config.json")
    tokenizer = _tokenizer(family, Path(source))
    eos = _ids(generation.get("eos_token_id"), config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None))
    if not eos:
        return None, "neither generation_config.json, config.json nor the tokenizer names an end-of-sequence token"
    pad = _ids(generation.get("pad_token_id"), config.get("pad_token_id"), getattr(tokenizer, "pad_token_id", None))
    bos = _ids(generation.get("bos_token_id"), config.get("bos_token_id"), getattr(tokenizer, "bos_token_id", None))

    decoder: dict[str, Any] = {"filename": ONNX_FILE, "head_size": head_size}
    # genai reads neither of these two when num_key_value_heads is given: written where known
    try:
        decoder["hidden_size"] = family.hidden_size(config)
    except RepskipError:
        pass
    try:
        decoder["num_attention_heads"] = family.geometry(config).heads
    except RepskipError:  # transformers' key, where the family gives no geometry
        if _is_int(config.get("num_attention_heads")):
            decoder["num_attention_heads"] = config["num_attention_heads"]
    decoder.update(
        num_key_value_heads=kv_heads,
        num_hidden_layers=len(kv_shapes),
        inputs={"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        outputs={"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    )
    model: dict[str, Any] = {"type": MODEL_TYPE, "context_length": context, "vocab_size": family.vocab_size(config)}
    if bos:
        model["bos_token_id"] = bos[0]
    # genai pads a batch on the right with pad_token_id and masks each row's trailing run of it
    model.update(eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=pad[0] if pad else eos[0],
                 decoder=decoder)

    max_length = generation.get("max_length")
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "num_beams": 1,
        "max_length": min(int(max_length), context) if _is_int(max_length) and max_length > 0 else context,
        # the graph returns the past and the new keys as a new tensor; it does not write into
        # a cache buffer of max_length shared between past and present
        "past_present_share_buffer": False,
    }
    for key, default in TRANSFORMERS_SEARCH.items():
        value = generation.get(key)
        search[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    return {"model": model, "search": search}, None


def write_genai_config(folder: Path, config: dict, family: Any, source: Path, kv_shapes: KVShapes | None) -> dict:
    """Write ``folder``/genai_config.json where the export can be described (see
    :func:`genai_config`); return the record the export's metadata keeps: whether the file
    was written, and why not."""
    doc, reason = genai_config(config, family, source, kv_shapes)
    path = Path(folder) / GENAI_FILE
    if doc is None:
        path.unlink(missing_ok=True)  # a copy from the source folder describes another graph
        return {"written": False, "reason": reason}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return {"written": True, "reason": None}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _tokenizer(family: Any, source: Path) -> Any:
    """The checkpoint's tokenizer, or None where it cannot be loaded: its special tokens only
    complete what the two JSON files say."""
    try:
        return family.load_tokenizer(source)
    except Exception:  # a tokenizer library raises its own error types for a missing or odd file
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(*values: Any) -> list[int]:
    """Token ids in the order given, each value an id, a list of ids or None, without repeats."""
    out: list[int] = []
    for value in values:
        for v in value if isinstance(value, list) else [value]:
            if _is_int(v) and v >= 0 and v not in out:
                out.append(v)
    return out
