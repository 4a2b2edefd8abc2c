"""benchmarks/profile_model.py --counts: the operator call counts that let two versions of the code be compared
for the work they do. The counts follow the work: one stage more runs more convolutions."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _counts(stages: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_model.py"), "--counts", "--size", "32",
                          "--stages", str(stages), "--threads", "1"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    lines = out.strip().splitlines()
    assert lines[-1].startswith("total ")
    counts = {name: int(n) for name, n in (line.rsplit(" ", 1) for line in lines[:-1])}
    assert list(counts) == sorted(counts)
    assert lines[-1] == f"total {sum(counts.values())} calls of {len(counts)} operators"
    return counts


def test_counts_are_sorted_by_name_and_grow_with_the_stages():
    one, two = _counts(1), _counts(2)
    convolution = next(name for name in one if "conv" in name)
    assert two[convolution] > one[convolution]
    assert _counts(1) == one                  # the same code does the same work: the lists diff clean
