"""The CPU allocator setting: modes, and that 'keep' really keeps freed memory (checked in a fresh process)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from utils.io.cpu_memory import _glibc, configure_cpu_malloc

REPO = Path(__file__).resolve().parents[2]

# In a fresh process: allocate and touch 256 MB, free it, and print how much of it the resident size gave back.
PROBE = """
import sys
sys.path.insert(0, {repo!r})
from utils.io.cpu_memory import configure_cpu_malloc
print(configure_cpu_malloc({mode!r}, "cpu"))
import numpy as np
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
block = np.ones(64 << 20, dtype=np.float32)
before = rss()
del block
print((before - rss()) / 2**20)
"""


def test_modes_and_their_errors():
    assert configure_cpu_malloc("system", "cpu") == "system allocator"
    assert configure_cpu_malloc("auto", "cuda") == "system allocator"
    with pytest.raises(ValueError, match="auto, keep, system"):
        configure_cpu_malloc("fast", "cpu")


@pytest.mark.skipif(_glibc() is None, reason="needs glibc on Linux")
def test_keep_holds_freed_memory_and_system_gives_it_back():
    returned = {}
    for mode in ("system", "keep"):
        out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), mode=mode)], capture_output=True,
                             text=True, check=True).stdout.split("\n")
        assert out[0] == ("glibc keeping freed memory for reuse" if mode == "keep" else "system allocator"), out
        returned[mode] = float(out[1])
    assert returned["system"] > 200, returned     # the 256 MB block went back to the system at once
    assert returned["keep"] < 16, returned        # kept for the next allocation
