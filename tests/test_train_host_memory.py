"""retain_freed_memory: glibc's allocator told to keep freed memory (what CPU training runs do)."""
import ctypes
import platform

import pytest

from cifarlab.train import host_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applies_once_on_glibc_and_large_blocks_then_come_from_the_heap():
    assert host_memory.retain_freed_memory() and host_memory.retain_freed_memory()  # idempotent
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.sbrk.restype = ctypes.c_void_p
    block = libc.malloc(64 << 20)  # over every mmap threshold glibc allows
    try:
        assert block <= libc.sbrk(0)  # inside the heap (below the program break), not a separate mapping
    finally:
        libc.free(ctypes.c_void_p(block))


def test_reports_false_where_there_is_no_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host_memory.retain_freed_memory() is False
