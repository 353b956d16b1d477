"""glibc's malloc, told to give large blocks back: a long-running picker's memory stays flat.

glibc serves a block above ``M_MMAP_THRESHOLD`` (128 KiB at start) with its own ``mmap``, returned to the system
on free. But after such a block is freed, glibc raises the threshold to that block's size (up to 32 MiB), so
the next ones of that size come from the heap instead. A picker allocates a few large blocks over and over
(request bodies, the prefix index's dict tables when they grow, gRPC messages); from the heap they interleave
with small long-lived objects, and the heap cannot shrink past them. Measured in the soak
(docs/benchmarks.md): the picker's ``[heap]`` mapping grew ~0.7 MB a minute at 100 req/s with the dynamic
threshold. Setting the threshold explicitly turns the adjustment off, so large blocks keep going back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed
ENVIRONMENT = "MALLOC_MMAP_THRESHOLD_"  # glibc reads this at start; a value there wins over ours


def _glibc() -> Any:
    """The C library if it is glibc (it has mallopt), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - raises AttributeError without glibc
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where there is no glibc (musl, macOS) or the
    environment already sets it."""
    if ENVIRONMENT in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; the heap may keep freed large blocks", threshold)
        return False
    return True
