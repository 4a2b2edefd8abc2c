"""Fixtures of the training tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.data.synthetic_sets import write_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A tiny synthetic set, "tiny": 8 trainval and 4 test images of 32x32."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, "tiny", n_trainval=8, n_test=4, size=32, seed=3)
    return root
