"""A checkpoint on disk: where it is, its config, and its tensors, read lazily.

Nothing here loads weights. Safetensors headers are parsed and checked against the file
sizes so that a truncated or corrupt file is caught before any work starts, and again by
the safetensors library itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from safetensors import SafetensorError, safe_open

from .errors import RepskipError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

# Bytes per element for the safetensors dtypes whose size is a whole number of bytes.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Config keys that change between saves of the same weights and must not change a fingerprint.
VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "_commit_hash", "use_cache",
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: absolute byte range in its file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsHeader:
    path: Path
    data_start: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check one safetensors file's header without touching its data."""
    path = Path(path)
    size = path.stat().st_size
    hint = "the file is truncated or corrupt: re-download or re-convert it"
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise RepskipError(f"{path}: not a safetensors file (only {size} bytes); {hint}")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise RepskipError(f"{path}: bad safetensors header length {header_len}; {hint}")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepskipError(f"{path}: unreadable safetensors header ({exc}); {hint}") from None
    if not isinstance(header, dict):
        raise RepskipError(f"{path}: safetensors header is not a JSON object; {hint}")
    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    covered = 0
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise RepskipError(f"{path}: malformed entry for tensor {name!r}; {hint}") from None
        if not 0 <= begin <= end <= data_len:
            raise RepskipError(
                f"{path}: tensor {name!r} lies past the end of the file "
                f"(needs byte {end}, file has {data_len}); {hint}"
            )
        if dtype in DTYPE_BYTES:
            numel = 1
            for d in shape:
                numel *= d
            if numel * DTYPE_BYTES[dtype] != end - begin:
                raise RepskipError(f"{path}: tensor {name!r} size does not match its shape; {hint}")
        covered += end - begin
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    if covered != data_len:
        raise RepskipError(
            f"{path}: the data section holds {data_len} bytes but the tensors cover {covered}; {hint}"
        )
    # A second opinion from the reference implementation (the numpy framework: checking a
    # header must not need torch).
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as exc:
        raise RepskipError(f"{path}: rejected by safetensors ({exc}); {hint}") from None
    return SafetensorsHeader(path, data_start, entries, dict(metadata))


@dataclass
class Checkpoint:
    """A Hugging Face-style checkpoint folder with safetensors weights."""

    path: Path
    config: dict
    files: list[Path]
    tensors: dict[str, TensorEntry]
    index: dict | None

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    def fingerprint(self) -> str:
        """A hash of what identifies the model: its config, its tensor names and shapes, and
        a sample of its weights (a fine-tune of the same architecture is another model).

        The sharding is left out, and so is the difference between fp32 and bf16 copies of
        the same weights (the sample is rounded to bf16). An fp16 copy can differ: rounding
        twice does not always land where rounding once does.
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.config, self.tensors)
        return self._fingerprint

    _fingerprint: str | None = field(default=None, repr=False)


SAMPLES_PER_TENSOR = 8
_FLOAT_FORMATS = {"F32": "<f", "F16": "<e", "F64": "<d"}


def _bf16_bits(value: float) -> int:
    """The bf16 bit pattern of ``value``: its float32 bits rounded to the nearest even 16."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _weight_sample(entries: list[TensorEntry]) -> bytes:
    """A few elements of every tensor at fixed relative positions, floats rounded to bf16 so
    that fp32 and bf16 copies of the same weights give the same bytes. Plain Python: a
    fingerprint must not need torch."""
    out = bytearray()
    handles: dict[Path, object] = {}
    try:
        for e in entries:
            size = DTYPE_BYTES.get(e.dtype)
            numel = e.nbytes // size if size else 0
            if not numel:
                continue
            fh = handles.get(e.file) or handles.setdefault(e.file, open(e.file, "rb"))
            picks = sorted({i * (numel - 1) // max(1, SAMPLES_PER_TENSOR - 1) for i in range(SAMPLES_PER_TENSOR)})
            for i in picks:
                fh.seek(e.start + i * size)
                raw = fh.read(size)
                if e.dtype == "BF16":
                    out += raw
                elif e.dtype in _FLOAT_FORMATS:
                    (value,) = struct.unpack(_FLOAT_FORMATS[e.dtype], raw)
                    out += struct.pack("<H", _bf16_bits(value))
                else:
                    out += raw
    finally:
        for h in handles.values():
            h.close()
    return bytes(out)


def fingerprint(config: dict, tensors: dict[str, TensorEntry]) -> str:
    stable = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    digest.update(json.dumps(stable, sort_keys=True, default=str).encode())
    names = sorted(tensors)
    for name in names:
        digest.update(f"{name}:{list(tensors[name].shape)};".encode())
    digest.update(_weight_sample([tensors[n] for n in names]))
    return "sha256:" + digest.hexdigest()[:32]


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise RepskipError(
            f"{path} is not a model checkpoint: it has no config.json "
            "(pass the folder that holds config.json and the *.safetensors files)"
        )
    try:
        config = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepskipError(f"{cfg} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise RepskipError(f"{cfg} does not hold a JSON object; fix or re-download it")
    return config


def shard_name_problem(name: object) -> str | None:
    """Why ``name``, a file named in an index's weight_map, may not be followed; None if it
    may. Lexical only: a name must stay inside the checkpoint folder as written, and symlinks
    are not resolved (a Hugging Face cache snapshot is a folder of links into blobs/)."""
    if not isinstance(name, str):
        return "not a file name"
    if not name or "\x00" in name or not name.isprintable():
        return "not a file name"
    parts = re.split(r"[\\/]", name)  # a backslash is a separator on Windows
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts:
        return "outside the checkpoint folder"
    if os.path.normpath(name.replace("\\", "/")) in (".", ""):
        return "not a file name"
    return None


def check_weight_map(path: Path, weight_map: object) -> None:
    """Refuse an index whose weight_map is not tensor name -> file name inside the folder."""
    fix = "re-download or re-convert the checkpoint"
    if not isinstance(weight_map, dict):
        raise RepskipError(
            f"{path}: the weight_map of {INDEX_NAME} is a JSON {_json_kind(weight_map)}, not an object "
            f"mapping tensor names to file names; {fix}"
        )
    for tensor, file in weight_map.items():
        problem = shard_name_problem(file)  # JSON object keys, the tensor names, are strings
        if problem is None:
            continue
        shown = file if isinstance(file, str) and file.isprintable() and file else json.dumps(file)
        if problem == "not a file name":
            raise RepskipError(
                f"{path}: {INDEX_NAME} maps tensor {json.dumps(tensor)} to {shown}, which is not a "
                f"file name; {fix}"
            )
        raise RepskipError(f"{path}: {INDEX_NAME} maps tensors to {shown}, {problem}; {fix}")


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a local checkpoint folder, checking every weight file's header."""
    path = Path(path)
    if not path.exists():
        raise RepskipError(f"model path {path} does not exist")
    if not path.is_dir():
        raise RepskipError(f"{path} is not a model checkpoint folder (it is a file)")
    config = read_config(path)
    index_file = path / INDEX_NAME
    index = None
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
            weight_map = index["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RepskipError(f"{index_file} is malformed ({exc}); re-download it") from None
        check_weight_map(path, weight_map)
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RepskipError(
                f"{path}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}"
            )
    elif (path / SINGLE_NAME).is_file():
        files = [path / SINGLE_NAME]
        weight_map = None
    else:
        pickled = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickled:
            raise RepskipError(
                f"{path} has only pickle weights ({pickled[0]}); repskip reads safetensors only "
                "because loading pickles can run arbitrary code: convert the checkpoint to "
                "safetensors with a tool you trust"
            )
        raise RepskipError(
            f"{path} is not a model checkpoint: no {SINGLE_NAME} or {INDEX_NAME} found"
        )
    tensors: dict[str, TensorEntry] = {}
    for f in files:
        for name, entry in read_header(f).entries.items():
            if name in tensors:
                raise RepskipError(f"{path}: tensor {name!r} is stored twice ({f.name})")
            tensors[name] = entry
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise RepskipError(
                f"{path}: {len(absent)} tensor(s) named in {INDEX_NAME} are not in the shards "
                f"(first: {absent[0]}); the checkpoint is incomplete"
            )
    return Checkpoint(path, config, files, tensors, index)


def resolve_model(model: str | os.PathLike) -> Path:
    """A local folder as it is, or a Hugging Face Hub id downloaded (and cached) as usual.

    Only safetensors weights and the small files around them are fetched; pickle weights
    are never downloaded.
    """
    text = str(model)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if text.startswith((".", "/", "~")) or not HUB_ID.match(text):
        raise RepskipError(f"model path {text} does not exist")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise RepskipError(f"{text} is not a local folder and huggingface_hub is not installed")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0]
        raise RepskipError(f"could not fetch {text} from the Hugging Face Hub: {first}") from None
    except Exception as exc:  # offline, DNS failure, not cached with HF_HUB_OFFLINE=1, ...
        raise RepskipError(
            f"{text} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}); check the network, or download it once and pass the "
            "local folder"
        ) from None
