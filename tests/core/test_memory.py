"""Returning freed memory (``core.memory``): a pure unit test."""

from __future__ import annotations

import sys

import pytest

from taskloom.core.memory import release_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_memory_goes_back_on_glibc() -> None:
    blocks = [bytearray(4096) for _ in range(10_000)]
    del blocks
    assert release_memory() is True
