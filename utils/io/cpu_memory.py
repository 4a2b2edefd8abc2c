"""How the C library hands out memory on the CPU, which decides much of DCONet's CPU speed at batch 8; and how
long idle OpenMP threads spin (``limit_openmp_spinning``), which decides it on a busy machine.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and returns it to the
system on free; the next allocation then faults in its pages one by one. A 32-channel float32 activation of a
256x256 batch of 8 is 64 MB, so a training step pays that on almost every tensor it makes. Keeping freed memory
for reuse instead (no mmap for large blocks, the heap trimmed only when more than 2 GB lie free at its top)
makes the same computation up to twice as fast at batch 8 (benchmarks/README.md), for a somewhat higher peak
resident size, which is then not given back while the process runs. Results do not change: only where the
bytes live does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MODES = ("auto", "keep", "system")
_M_TRIM_THRESHOLD = -1     # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_BYTES = 2**31 - 1    # mallopt takes an int: the largest trim threshold it can set (2 GiB)


def _glibc():
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    return libc


def configure_cpu_malloc(mode: str, device_type: str) -> str:
    """Apply ``mode`` for a process computing on ``device_type``; returns what is now in effect, for the log.

    ``keep``: keep freed memory for reuse (glibc only); ``system``: leave the C library as it is; ``auto``:
    ``keep`` when computing on the CPU, else ``system``. The setting holds for the rest of the process.
    """
    if mode not in MODES:
        raise ValueError(f"cpu malloc mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "system" or (mode == "auto" and device_type != "cpu"):
        return "system allocator"
    libc = _glibc()
    if libc is None:
        if mode == "keep":
            print("note: --cpu-malloc keep needs glibc (Linux); the C library's defaults stay", file=sys.stderr)
        return "system allocator (not glibc)"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES) != 1:
        return "system allocator (mallopt refused)"
    return "glibc keeping freed memory for reuse"


SPIN_COUNT = "1000"


def limit_openmp_spinning() -> None:
    """Let idle OpenMP threads sleep after 1,000 spins instead of libgomp's default of about 300,000.

    Call it before torch is imported (libgomp reads the setting once, when it loads). Inference is hundreds of
    short parallel regions per image; when other processes want the cores, threads spinning at every region's end
    crowd out the thread the region waits for, and a region can cost a scheduler time slice (the README's export
    speed table has the figures). A wait policy or spin count set in the environment is kept
    (``GOMP_SPINCOUNT=300000`` restores the default)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
