"""Keep freed host memory in the process (glibc), so CPU training stops paying page faults every step.

glibc's malloc serves each block over its mmap threshold (at most 32 MB, e.g. one float32 batch of 256 x 32
channels x 32 x 32 activations) with a fresh mmap, returned to the system when freed: every step then faults in
and zeroes those pages again. Serving everything from the heap and never trimming it lets a training step reuse
the previous step's pages. Measured on the 2-core CPU (benchmarks/dp_speed.py, batch 256, best of 5): the plain
`cnn` step 500 -> 383 ms and its DP step 703 -> 496 ms; the `wrn` DP step 1,127 -> 711 ms. The cost: the
process keeps its peak memory until it exits. PyTorch has no switch for this on CPU, hence mallopt.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Tell glibc to allocate without mmap and never trim the heap; True if it took effect (False off glibc)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
