"""Physically remove decoder layers from a checkpoint, working on files.

Tensors are never loaded: each kept tensor's bytes are copied from its source file into a
new size-capped shard (kernel-side with copy_file_range where the platform has it), so
memory stays flat whatever the model size and the dtype is preserved bit for bit. The
output is assembled in a temporary folder beside the destination and renamed into place
only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, TensorEntry, read_header
from ..errors import RepskipError
from ..outputs import atomic_dir, check_output

# Weight files of other formats are never copied into the output.
SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx", ".onnx_data"}
# The source's README.md is its own model card: the output gets one of its own (repskip.card).
SKIP_NAMES = {INDEX_NAME, "pytorch_model.bin.index.json", "config.json", "README.md"}
RECIPE_NAME = "repskip-recipe.yaml"
COPY_CHUNK = 64 * 1024 * 1024
DEFAULT_SHARD_SIZE = 2 * 1024**3


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise RepskipError(f"cannot read size {text!r}; write it like 2GB, 500MB or 1.5GiB")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").lower()
    base = 1024 if suffix == "ib" else 1000
    size = int(number * base ** "_KMGT".index(unit or "_"))
    if size < 1:
        raise RepskipError(f"shard size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class Planned:
    source: TensorEntry
    name: str  # name in the output
    fold: Any = None  # (T, axis): the output holds T^T @ tensor along axis (repskip.repair.linear)
    data: bytes | None = None  # new bytes for the tensor (same dtype and shape): a healed weight


def plan_tensors(ckpt: Checkpoint, prefix: str, kept: Sequence[int], num_layers: int) -> list[Planned]:
    """Kept tensors in source order, layers renamed to contiguous indices."""
    renumber = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    planned = []
    order = sorted(ckpt.tensors.values(), key=lambda e: (str(e.file), e.start))
    for entry in order:
        m = pattern.fullmatch(entry.name)
        if m is None:
            planned.append(Planned(entry, entry.name))
            continue
        old = int(m.group(1))
        if old >= num_layers:
            raise RepskipError(
                f"tensor {entry.name} names layer {old} but config.json declares {num_layers} "
                "layers; the checkpoint is inconsistent"
            )
        if old in renumber:
            planned.append(Planned(entry, f"{prefix}{renumber[old]}.{m.group(2)}"))
    return planned


def attach_folds(planned: list[Planned], folds: dict[str, Any]) -> list[Planned]:
    """Mark the tensors (by source name) that take a repair map; every one must exist."""
    names = {item.source.name for item in planned}
    missing = sorted(set(folds) - names)
    if missing:
        raise RepskipError(f"the repair folds into {missing[0]}, which this checkpoint does not have (or removes)")
    return [replace(item, fold=folds[item.source.name]) if item.source.name in folds else item for item in planned]


def attach_data(planned: list[Planned], data: dict[str, bytes]) -> list[Planned]:
    """Give the tensors named in ``data`` (output names) new bytes of the same dtype and shape."""
    by_name = {item.name: item for item in planned}
    for name, raw in data.items():
        item = by_name.get(name)
        if item is None:
            raise RepskipError(f"cannot write tensor {name}: the checkpoint has no tensor of that name")
        if len(raw) != item.source.nbytes:
            raise RepskipError(f"new data for {name} is {len(raw)} bytes, the tensor holds {item.source.nbytes}")
    return [replace(item, data=data[item.name]) if item.name in data else item for item in planned]


def _shards(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in planned:
        if shards[-1] and size + item.source.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.source.nbytes
    return shards


def _copy_range(src, dst, start: int, length: int) -> None:
    # the kernel copy writes at the file descriptor's offset: what Python still buffers (a
    # small tensor written just before) must be there first
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    offset, remaining = start, length
    if hasattr(os, "copy_file_range"):
        try:
            while remaining:
                n = os.copy_file_range(src_fd, dst_fd, min(remaining, COPY_CHUNK), offset)
                if n == 0:
                    raise RepskipError(f"{src.name} ended early while copying; it is truncated")
                offset += n
                remaining -= n
            return
        except OSError as exc:
            if exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                raise
            dst.seek(0, os.SEEK_END)  # carry on with plain reads from where the kernel stopped
    src.seek(offset)
    while remaining:
        chunk = src.read(min(remaining, COPY_CHUNK))
        if not chunk:
            raise RepskipError(f"{src.name} ended early while copying; it is truncated")
        dst.write(chunk)
        remaining -= len(chunk)


def _write_shard(path: Path, items: list[Planned], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for item in items:
        e = item.source
        header[item.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    handles: dict[Path, object] = {}
    try:
        with open(path, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)))
            dst.write(raw)
            dst.flush()
            for item in items:
                src = handles.get(item.source.file)
                if src is None:
                    src = handles[item.source.file] = open(item.source.file, "rb")
                if item.data is not None:
                    dst.write(item.data)
                    continue
                if item.fold is None:
                    _copy_range(src, dst, item.source.start, item.source.nbytes)
                    continue
                from ..repair.linear import fold_bytes  # numpy only: still no torch

                src.seek(item.source.start)
                t, axis = item.fold
                dst.write(fold_bytes(src.read(item.source.nbytes), item.source.dtype, item.source.shape, t, axis))
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        for h in handles.values():
            h.close()


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    copied = []
    for item in sorted(src_dir.iterdir()):
        if not item.is_file() or item.name.startswith("."):
            continue
        if item.suffix in SKIP_SUFFIXES or item.name in SKIP_NAMES:
            continue
        shutil.copy2(item, dst_dir / item.name)
        copied.append(item.name)
    return copied


@dataclass(frozen=True)
class CompressResult:
    output: Path
    kept: list[int]
    removed: list[int]
    shards: int
    bytes_in: int
    bytes_out: int
    side_files: list[str]


def write_pruned(
    ckpt: Checkpoint,
    *,
    prefix: str,
    num_layers: int,
    kept: Sequence[int],
    new_config: dict,
    output: Path,
    recipe_yaml: str,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    folds: dict[str, Any] | None = None,
    finish: Callable[[Path], None] | None = None,
) -> CompressResult:
    """Write ``ckpt`` without the removed layers into ``output``, atomically; ``folds`` maps
    source tensor names to (linear repair map T, axis), folded in on the way (T^T @ tensor
    along the axis); ``finish(folder)`` as write_checkpoint has it."""
    output = Path(output)
    check_output(output, force, [ckpt.path])
    planned = attach_folds(plan_tensors(ckpt, prefix, kept, num_layers), folds or {})
    shards, side = write_checkpoint(ckpt, planned, new_config, output, {RECIPE_NAME: recipe_yaml},
                                    max_shard_size=max_shard_size, force=force, command="compress", finish=finish)
    removed = [i for i in range(num_layers) if i not in set(kept)]
    return CompressResult(
        output=output,
        kept=list(kept),
        removed=removed,
        shards=shards,
        bytes_in=ckpt.total_bytes,
        bytes_out=sum(item.source.nbytes for item in planned),
        side_files=side,
    )


def write_checkpoint(
    ckpt: Checkpoint,
    planned: list[Planned],
    new_config: dict,
    output: Path,
    files: dict[str, str],
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    command: str = "compress",
    inputs: Sequence[Path] = (),
    finish: Callable[[Path], None] | None = None,
) -> tuple[int, list[str]]:
    """Write the ``planned`` tensors, ``new_config``, the input's side files (tokenizer,
    generation config, ...) and ``files`` (name -> text) into ``output``, atomically;
    ``finish(folder)`` runs on the complete folder before it is put in place (an exception
    there leaves nothing). Returns the number of shards and the side files copied."""
    shards = _shards(planned, max_shard_size)
    first_meta = read_header(ckpt.files[0]).metadata
    metadata = {**first_meta, "format": first_meta.get("format", "pt")}
    with atomic_dir(output, force, [ckpt.path, *inputs], command=command) as tmp:
        names = (
            [SINGLE_NAME]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for name, items in zip(names, shards):
            _write_shard(tmp / name, items, metadata)
            weight_map.update({item.name: name for item in items})
        if len(shards) > 1:
            total = sum(item.source.nbytes for item in planned)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        side = copy_side_files(ckpt.path, tmp)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text)
        for name in names:  # re-read what was written before it is put in place
            read_header(tmp / name)
        if finish is not None:
            finish(tmp)
    return len(shards), side
