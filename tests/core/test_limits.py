"""Size limits shared by supervisor and worker: cutting text, batching by weight."""

from __future__ import annotations

from taskloom.core.limits import batches, cut_text


def test_text_over_its_limit_is_cut_to_it_with_a_marker_and_whole_characters() -> None:
    text, cut = cut_text("é" * 1000, 100, "TASKLOOM_X")
    assert cut and len(text.encode()) <= 100
    assert text.endswith("[… cut to 100 of 2,000 bytes (TASKLOOM_X)]")
    assert cut_text("short", 100, "X") == ("short", False)


def test_batches_keep_order_and_stay_within_their_weight_and_count() -> None:
    items = [5, 5, 5, 20, 1, 1, 1, 1]
    assert list(batches(items, lambda x: x, 10)) == [[5, 5], [5], [20], [1, 1, 1, 1]]
    assert list(batches(items, lambda x: x, 100, most=3)) == [[5, 5, 5], [20, 1, 1], [1, 1]]
    assert list(batches([], lambda x: x, 10)) == []
