"""Names of the files an export folder holds, importable without torch."""

from __future__ import annotations

from pathlib import Path

ONNX_FILE = "model.onnx"
META_FILE = "repskip-onnx.json"
# The two graph signatures an ONNX export has (see repskip.runtime).
CAUSAL = "causal-lm-with-past"
MASKED = "masked-lm"


def is_onnx_folder(path: Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file()
