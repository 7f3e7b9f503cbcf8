"""Work on many items in a thread pool without a ``Future`` for each of them at once.

``ThreadPoolExecutor.map`` submits every item before it returns its first result: a
``Future`` (with its lock and condition, about 1 KB) per item, all alive until the caller has
consumed them. Over the blobs of a bucket with a million objects that is a gigabyte.
``in_pool`` keeps at most ``ahead`` items submitted and not yet handed to the caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_AHEAD = 256


def in_pool(pool: Executor, work: Callable[[T], R], items: Iterable[T], *,
            ahead: int = DEFAULT_AHEAD) -> Iterator[R]:
    """``work(item)`` for each of ``items`` in ``pool``, the results in the items' order, as
    ``pool.map`` gives them, but with at most ``ahead`` items submitted ahead of the caller
    (``items`` is read as it goes, so it may be a generator). An exception in ``work``
    reaches the caller at its item; a caller that stops early (an exception, ``break``, the
    generator closed) cancels what has not started."""
    pending: deque[Future[R]] = deque()
    ahead = max(1, ahead)
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
