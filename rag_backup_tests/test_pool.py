"""in_pool: pool.map's results in order, without a Future per item at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_backup.pool import in_pool


class Counting:
    """Items handed out one by one, noting how many were taken ahead of the caller."""

    def __init__(self, n: int) -> None:
        self.n, self.taken, self.consumed, self.most_ahead = n, 0, 0, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            self.most_ahead = max(self.most_ahead, self.taken - self.consumed)
            yield i


def test_results_in_order_with_at_most_ahead_items_submitted():
    items = Counting(5_000)
    with ThreadPoolExecutor(8) as pool:
        results = []
        for result in in_pool(pool, lambda i: i * i, items, ahead=16):
            items.consumed += 1
            results.append(result)
    assert results == [i * i for i in range(5_000)]
    assert 1 < items.most_ahead <= 16


def test_an_error_reaches_the_caller_at_its_item_and_the_rest_is_cancelled():
    started: list[int] = []
    gate = threading.Event()

    def work(i: int) -> int:
        started.append(i)
        if i == 3:
            raise ValueError("item 3 is bad")
        if i > 3:
            gate.wait(5)
        return i

    seen = []
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(ValueError, match="item 3 is bad"):
            for result in in_pool(pool, work, range(1_000), ahead=8):
                seen.append(result)
        gate.set()
    assert seen == [0, 1, 2]
    assert len(started) < 20  # what was queued behind the failure never ran
