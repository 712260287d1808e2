import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import FAMILIES, make_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """family name -> path of a tiny random checkpoint in that family's layout."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_checkpoint(root / fam, fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory):
    """A Qwen2-layout checkpoint split over many shards, so layers straddle files."""
    return make_checkpoint(tmp_path_factory.mktemp("sharded") / "qwen2", "qwen2", seed=7, max_shard_size="60KB")
