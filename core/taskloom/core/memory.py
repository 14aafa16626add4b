"""Give freed memory back to the system.

CPython keeps the arenas of freed objects, and glibc's malloc the pages of
freed blocks, for reuse: after a large task the supervisor's resident size
stays near its peak though the objects are gone. A full collection, then
``malloc_trim`` (glibc only; elsewhere a no-op), returns what is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def release_memory() -> bool:
    """Collect garbage and return free heap pages; whether the C library could."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
