"""The generic transformers family against what the hand-written one wrote before it: the
same analysis.json statistics, the same repair maps, byte-identical shards (fixtures recorded
by tests/regression.py with the code path it replaced)."""

import json

import pytest

import regression
from helpers import make_checkpoint

TINY = json.loads((regression.FIXTURES / "regression_tiny.json").read_text())


def _compare(got: dict, want: dict) -> None:
    assert got["input"] == want["input"], "the test checkpoint itself changed (torch or the helper): re-record"
    for key in ("removed", "repair_maps", "shards", "config", "paper_removed", "paper_shards", "paper_config"):
        assert got[key] == want[key], key
    for key in regression.STATISTICS:
        assert got["analysis"][key] == want["analysis"][key], key


@pytest.mark.parametrize("family", regression.TINY_FAMILIES)
def test_tiny_checkpoints_analyse_and_compress_as_before(family, tmp_path):
    model = make_checkpoint(tmp_path / family, family, seed=regression.TINY_FAMILIES.index(family))
    got = {"input": regression.checkpoint_digest(model), **regression.outputs(model, tmp_path / "work", *regression.TINY_ARGS)}
    _compare(got, TINY[family])


@pytest.mark.slow
def test_smollm2_analyses_and_compresses_as_before(tmp_path):
    want = json.loads((regression.FIXTURES / "regression_smollm2.json").read_text())
    _compare(regression.record_smollm2(tmp_path), want)
