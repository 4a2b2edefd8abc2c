"""Finding data sets: the hint of a missing one lists the folders laid out as data sets, not their splits."""
from __future__ import annotations

import pytest

from utils.data.splits import DatasetError, locate_split, validate_split
from utils.data.synthetic_sets import write_dataset


def test_the_hint_lists_data_sets_not_their_split_folders(tmp_path):
    write_dataset(tmp_path, "tiny", n_trainval=2, n_test=2, size=32, seed=0)
    listed = tmp_path / "listed"                                  # the split-file layout
    (listed / "images").mkdir(parents=True)
    (listed / "test.txt").write_text("a\n")
    (tmp_path / "notes").mkdir()                                  # a folder that is no data set
    problems = locate_split(tmp_path, "absent", "test").problems
    assert problems and f"(data sets found under {tmp_path}: listed, tiny)" in problems[0], problems
    # a data set's own folder given as the root: its splits are not offered as data sets
    problems = locate_split(tmp_path / "tiny", "absent", "test").problems
    assert (f"(data sets found under {tmp_path / 'tiny'}: none); {tmp_path / 'tiny'} is itself a data set: give "
            f"its parent as --data-root and tiny as --dataset") in problems[0], problems
    with pytest.raises(DatasetError, match="data sets found under"):
        validate_split(locate_split(tmp_path / "tiny", "absent", "test"))
