"""The generic transformers family against what the hand-written one wrote before it: the
same analysis.json statistics, the same layers and repair anchors, the same shards (byte for
byte where no arithmetic is involved, to float rounding where the fold is; see
tests/regression.py)."""

import json
import math

import pytest

import regression
from helpers import make_checkpoint

TINY = json.loads((regression.FIXTURES / "regression_tiny.json").read_text())


def _close(got, want, where: str) -> None:
    """Equal, floats to a relative 1e-4 (the statistics are rounded to 6 decimals after
    arithmetic that differs between CPUs in the last bits)."""
    if isinstance(want, float) or isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=2e-6), (where, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _close(a, b, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def _compare(got: dict, want: dict) -> None:
    assert got["input"] == want["input"], "the test checkpoint itself changed (torch or the helper): re-record"
    for key in ("removed", "repair_maps", "shard_files", "config", "paper_removed", "paper_shards", "paper_config"):
        assert got[key] == want[key], key
    assert got["tensors"].keys() == want["tensors"].keys()
    for name, tensor in want["tensors"].items():
        if got["tensors"][name]["sha256"] != tensor["sha256"]:  # computed, not copied: to rounding
            norm = tensor["sketch"][1]
            for a, b in zip(got["tensors"][name]["sketch"], tensor["sketch"]):
                assert abs(a - b) <= 1e-4 * norm + 1e-9, (name, got["tensors"][name]["sketch"], tensor["sketch"])
    for key in regression.STATISTICS:
        _close(got["analysis"][key], want["analysis"][key], key)


@pytest.mark.parametrize("family", regression.TINY_FAMILIES)
def test_tiny_checkpoints_analyse_and_compress_as_before(family, tmp_path):
    model = make_checkpoint(tmp_path / family, family, seed=regression.TINY_FAMILIES.index(family))
    got = {"input": regression.checkpoint_digest(model), **regression.outputs(model, tmp_path / "work", *regression.TINY_ARGS)}
    _compare(got, TINY[family])


@pytest.mark.slow
def test_smollm2_analyses_and_compresses_as_before(tmp_path):
    want = json.loads((regression.FIXTURES / "regression_smollm2.json").read_text())
    _compare(regression.record_smollm2(tmp_path), want)
