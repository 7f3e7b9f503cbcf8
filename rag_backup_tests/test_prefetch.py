"""``engines.prefetch.read_ahead``: order, bounded look-ahead, errors where they happened, and
an early stop that stops the producer and closes the source (the Milvus engines read through
it; their round trips are tested against the real server in test_milvus)."""

from __future__ import annotations

import threading
from contextlib import closing

import pytest

from rag_backup import progress
from rag_backup.engines.prefetch import read_ahead


def test_items_arrive_in_order_and_the_producer_stays_within_depth():
    produced: list[int] = []
    consumed_up_to = [-1]
    overrun: list[tuple[int, int]] = []

    def source():
        for i in range(200):
            # besides the item the caller holds, at most depth (2) wait, and the producer
            # holds the one it tries to hand over
            if i - consumed_up_to[0] > 4:
                overrun.append((i, consumed_up_to[0]))
            produced.append(i)
            yield i

    seen = []
    for item in read_ahead(source(), depth=2):
        seen.append(item)
        consumed_up_to[0] = item
    assert seen == list(range(200))
    assert produced == seen
    assert overrun == []


def test_an_error_in_the_producer_reaches_the_caller_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("the store said no")

    seen = []
    with pytest.raises(ValueError, match="the store said no"):
        for item in read_ahead(source()):
            seen.append(item)
    assert seen == [1, 2]


def test_stopping_early_stops_the_producer_and_closes_the_source():
    closed = threading.Event()
    produced: list[int] = []

    def source():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    ahead = read_ahead(source(), depth=1)
    with closing(ahead):
        for item in ahead:
            if item == 3:
                break
    assert closed.is_set()
    assert len(produced) <= 6
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_the_producer_advances_the_callers_progress_tracker():
    def source():
        for block in (b"abc", b"de", b"f"):
            progress.advance(len(block))  # as a checked read does, in the producer's thread
            yield block

    with progress.tracking("unpacking", 6) as tracker:
        assert b"".join(read_ahead(source())) == b"abcdef"
    assert tracker.done == 6
