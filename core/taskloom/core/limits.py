"""Size limits that the supervisor and the worker apply the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

OVERFLOW_HINT = (
    "return less, or have the supervisor cut long outputs (TASKLOOM_OUTPUT_OVERFLOW=truncate)"
)


def fit_output(output: str, max_bytes: int, *, truncate: bool) -> tuple[str, str]:
    """``(output, "")`` if it fits in ``max_bytes`` of UTF-8 (0: no limit) or is
    cut to fit with a marker; ``("", error)`` if it is too large and not cut."""
    # A character is at most 4 bytes of UTF-8: most outputs fit without
    # being encoded (this runs for every result, on worker and supervisor).
    if not max_bytes or len(output) * 4 <= max_bytes:
        return output, ""
    size = len(output.encode())
    if size <= max_bytes:
        return output, ""
    if not truncate:
        return "", (
            f"the output is {size:,} bytes; the limit is {max_bytes:,} "
            f"(TASKLOOM_MAX_OUTPUT_BYTES): {OVERFLOW_HINT}"
        )
    marker = f"\n[… output cut to fit {max_bytes:,} of {size:,} bytes (TASKLOOM_MAX_OUTPUT_BYTES)]"
    keep = max(0, max_bytes - len(marker.encode()))
    return output.encode()[:keep].decode(errors="ignore") + marker, ""


def cut_text(text: str, max_bytes: int, what: str) -> tuple[str, bool]:
    """``text`` cut to ``max_bytes`` of UTF-8 with a marker naming ``what``
    limit it met, and whether it was cut."""
    if len(text) * 4 <= max_bytes:
        return text, False
    data = text.encode()
    if len(data) <= max_bytes:
        return text, False
    marker = f" [… cut to {max_bytes:,} of {len(data):,} bytes ({what})]"
    keep = max(0, max_bytes - len(marker.encode()))
    return data[:keep].decode(errors="ignore") + marker, True


def batches(
    items: Iterable[T], weight: Callable[[T], int], limit: int, *, most: int = 0
) -> Iterator[list[T]]:
    """``items`` in order, in lists whose weights add up to at most ``limit``
    (and of at most ``most`` items, if given); an item heavier than ``limit``
    goes alone."""
    batch: list[T] = []
    total = 0
    for item in items:
        w = weight(item)
        if batch and (total + w > limit or (most and len(batch) >= most)):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += w
    if batch:
        yield batch
