"""Reading ahead: a thread produces the next items of an iterator while the caller works on the
current one, so a store's round trip (the server's time) overlaps this process's work on the
batch before (converting, compressing, encrypting, writing) instead of adding to it.

Bounded: at most ``depth`` items wait besides the one the caller holds. An exception in the
producer reaches the caller at the item where it happened; a caller that stops early (an
exception, ``break``) stops the producer and closes the source iterator in its own thread. The
producer runs in a copy of the caller's context, so the progress tracker current there
(``progress.tracking``) counts what the producer advances.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_S = 0.1


def read_ahead(items: Iterator[T], *, depth: int = 1, name: str = "read-ahead") -> Iterator[T]:
    """``items``, produced by a thread up to ``depth`` ahead of the caller."""
    waiting: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def hand_over(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                waiting.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((True, item)):
                    return
            hand_over((True, _DONE))
        except BaseException as exc:  # handed to the caller, raised there
            hand_over((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(produce,), name=name,
                              daemon=True)
    thread.start()
    try:
        while True:
            ok, item = waiting.get()
            if not ok:
                raise item  # type: ignore[misc]
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
