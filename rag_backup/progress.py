"""Progress of long operations (backups, verifications, restores), Dagster-free.

Why: a backup, verification or restore of a large store runs for minutes or hours and used to
print nothing between its start and its end. An operator wants to know that it moves, how fast,
and when it will be done, in a Dagster run's log and in the command line alike.

How it fits together:

- An engine operation opens a tracker around the work it knows the size of::

      with progress.tracking(f"pg_dump of {database}", total=estimate, estimated=True):
          compress_into(...)          # its byte loop calls progress.advance(len(block))

  ``tracking`` makes the tracker the *current* one (a ``contextvars.ContextVar``), so the
  low-level loops (``zstream.copy_stream``, ``decompress_artifact``, ...) only call the
  module-level ``advance(n, unit=...)``: a no-op when nothing is tracked, or when the current
  tracker counts another unit (a byte loop inside a restore counted in rows adds nothing).
  Threads do not inherit a context: work done in a pool advances the tracker from the thread
  that collects the results (or gets the ``Progress`` passed explicitly, or runs in
  ``contextvars.copy_context()``).
- A tracker reports through the standard logging logger ``rag_backup.progress``: a record whose
  message is the line and whose ``extra={"progress": ProgressSnapshot}`` carries the numbers, at
  most one every ``RAG_PROGRESS_EVERY_S`` seconds (default 30) per tracker, plus a final line
  when it ends, e.g. ``pg_dump of ragqa: 1.2 GB of ~3.4 GB (35%), 84 MB/s, about 26 s left``.
  A total read from a manifest is exact; one estimated from the server (table sizes, the
  previous backup's size) is shown with ``~``; without a total, a line has no percent and no
  time left.
- In Dagster runs the logger is a managed python logger (``python_logs:
  managed_python_loggers: [rag_backup.progress]`` in ``dagster.yaml``), so the lines are in the
  run's event log. The command line renders the same records as rich progress bars with
  ``rich_progress()``.

Progress never fails an operation: a tracker only counts and logs.

Stopping: an operation running in another thread (``recovery.each_store`` runs the stores'
restores at once) cannot be interrupted by a signal; its caller sets an event
(``stop_when``) and the operation's own loops stop at their next ``checkpoint``: ``advance``
and ``follow`` call it, and so do the waits for work a server does alone (index builds, WAL
replay). ``Stopped`` is a ``BaseException``, as ``KeyboardInterrupt`` is: it passes every
``except Exception`` and runs every clean-up on its way out (a staging database dropped, a
tool's process group killed).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

LOGGER = logging.getLogger("rag_backup.progress")
BYTES = "bytes"
EVERY_ENV = "RAG_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0
MIN_POLL_S = 0.2  # ``follow`` measures at most this often (and not more often than it reports)

_CURRENT: ContextVar[Progress | None] = ContextVar("rag_backup_progress", default=None)
_STOP: ContextVar[threading.Event | None] = ContextVar("rag_backup_stop", default=None)
_IDS = itertools.count(1)
_every_override: float | None = None  # set by rich_progress: bars want frequent updates


def report_every_s() -> float:
    """Seconds between two lines of one tracker: ``RAG_PROGRESS_EVERY_S`` (0: every advance),
    30 when unset or not a number."""
    if _every_override is not None:
        return _every_override
    raw = os.environ.get(EVERY_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S
    return value if value >= 0 else DEFAULT_EVERY_S


# -- what a line says ------------------------------------------------------------------------

def format_bytes(n: float) -> str:
    """Decimal units, as disks and network rates are sold, two figures at least: ``840 B``,
    ``1.2 GB``, ``84 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 10 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``26 s``, ``4 min 10 s``, ``1 h 12 min``: precise enough for an estimate."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min"


def _amount(n: float, unit: str) -> str:
    return format_bytes(n) if unit == BYTES else f"{n:,.0f}"


@dataclass(frozen=True)
class ProgressSnapshot:
    """One tracker at one moment: what a progress line says, as numbers (``extra`` of the
    log record). ``tracker`` tells apart the lines of different trackers (one bar each)."""

    tracker: int
    what: str
    unit: str
    done: int
    total: int | None
    estimated: bool        # the total is an estimate (shown as "~")
    elapsed_s: float
    final: bool = False    # the operation ended (this is its last line)
    failed: bool = False   # ... with an error

    @property
    def rate(self) -> float | None:
        """Units per second, averaged since the start (None before any time passed)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else None

    @property
    def percent(self) -> int | None:
        """Whole percent done, when the total is known (and not passed, for an estimate)."""
        if not self.total or self.done > self.total:
            return None
        return min(100, self.done * 100 // self.total)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the average rate, when the total is known and not yet reached."""
        rate = self.rate
        if self.percent is None or not rate or self.total is None or self.done >= self.total:
            return None
        return (self.total - self.done) / rate

    def amounts(self) -> str:
        """``1.2 GB of ~3.4 GB``, ``1,200 of 5,000 rows``, or ``1.2 GB`` without a total."""
        unit = "" if self.unit == BYTES else f" {self.unit}"
        done = _amount(self.done, self.unit)
        if self.total is None:
            return done + unit
        total = ("~" if self.estimated else "") + _amount(self.total, self.unit)
        if self.done > self.total and self.estimated:
            return f"{done}{unit} (more than the estimated {total})"
        return f"{done} of {total}{unit}"

    def rate_text(self) -> str | None:
        rate = self.rate
        if rate is None:
            return None
        if self.unit == BYTES:
            return f"{format_bytes(rate)}/s"
        return f"{rate:,.1f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"

    def detail(self) -> str:
        """The line without the operation's name (what a progress bar shows beside it)."""
        rate = self.rate_text()
        if self.final:
            verb = "stopped after" if self.failed else "finished,"
            took = f"{verb} {self.amounts()} in {format_duration(self.elapsed_s)}"
            return f"{took} ({rate})" if rate else took
        parts = [self.amounts() + (f" ({self.percent}%)" if self.percent is not None else "")]
        if rate:
            parts.append(rate)
        if self.eta_s is not None:  # rounded up: "about 0 s left" while work is left is wrong
            parts.append(f"about {format_duration(math.ceil(self.eta_s))} left")
        return ", ".join(parts)

    def line(self) -> str:
        return f"{self.what}: {self.detail()}"


# -- the tracker -----------------------------------------------------------------------------

class Progress:
    """Counts one operation's work (in ``unit``: bytes, rows, objects, keys) against its
    ``total`` and logs a line at most every ``every_s`` seconds and when it ends (``finish``).

    Thread-safe: several threads may ``advance`` one tracker. ``clock`` is injectable for
    tests; ``every_s`` defaults to ``report_every_s()``."""

    def __init__(self, what: str, total: int | None = None, unit: str = BYTES, *,
                 estimated: bool = False, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = LOGGER) -> None:
        self.what, self.unit, self.estimated = what, unit, estimated
        self.total = total if total is None or total >= 0 else None
        self.every_s = report_every_s() if every_s is None else every_s
        self.id = next(_IDS)
        self.done = 0
        self.finished = False
        self._clock, self._logger = clock, logger
        self._lock = threading.Lock()
        self._started = self._reported = clock()

    def snapshot(self, *, final: bool = False, failed: bool = False) -> ProgressSnapshot:
        return ProgressSnapshot(self.id, self.what, self.unit, self.done, self.total,
                                self.estimated, self._clock() - self._started, final, failed)

    def advance(self, n: int) -> None:
        """``n`` more units done (0: nothing new, but a line is still due after a while: a
        stalled operation says so)."""
        with self._lock:
            if self.finished:
                return
            self.done += max(0, n)
            now = self._clock()
            if now - self._reported < self.every_s:
                return
            self._reported = now
            snap = self.snapshot()
        self._log(snap)

    def reach(self, done: int) -> None:
        """Advance to ``done`` units in all (a measure taken from outside, e.g. a file's size);
        a smaller figure than already counted adds nothing."""
        self.advance(max(0, done - self.done))

    def set_total(self, total: int | None, *, estimated: bool = False) -> None:
        """The total, once known (or better estimated) after the tracker started."""
        with self._lock:
            self.total, self.estimated = total, estimated

    def finish(self, *, failed: bool = False) -> None:
        """The final line (once): what was done, in how long, at which average rate."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            snap = self.snapshot(final=True, failed=failed)
        self._log(snap)

    def _log(self, snap: ProgressSnapshot) -> None:
        try:
            self._logger.info(snap.line(), extra={"progress": snap})
        except Exception:  # noqa: BLE001 - a broken handler must not fail the operation
            pass


@contextmanager
def tracking(what: str, total: int | None = None, unit: str = BYTES, *,
             estimated: bool = False) -> Iterator[Progress]:
    """Track an operation: a ``Progress`` that is the current tracker inside the block (the
    one ``advance`` feeds) and logs its final line when the block ends, "stopped after" when
    it raised. Trackers nest: the innermost is current."""
    tracker = Progress(what, total, unit, estimated=estimated)
    token = _CURRENT.set(tracker)
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        _CURRENT.reset(token)
        tracker.finish(failed=failed)


def current() -> Progress | None:
    """The tracker of the operation in progress in this context, if any."""
    return _CURRENT.get()


class Stopped(BaseException):
    """The operation was told to stop (its caller was interrupted: see the module's doc)."""


def stop_when(event: threading.Event) -> None:
    """In this context (a thread's own copy), ``checkpoint`` raises ``Stopped`` once ``event``
    is set."""
    _STOP.set(event)


def checkpoint() -> None:
    """Raise ``Stopped`` if this context's operation was told to stop; else nothing."""
    event = _STOP.get()
    if event is not None and event.is_set():
        raise Stopped("interrupted: the run was stopped while this store was restoring")


def advance(n: int, unit: str = BYTES) -> None:
    """``n`` units done for the current tracker: what the loops that move data call. A no-op
    without a tracker, or when the current one counts another unit. A ``checkpoint``."""
    checkpoint()
    tracker = _CURRENT.get()
    if tracker is not None and tracker.unit == unit:
        tracker.advance(n)


def follow(proc: subprocess.Popen[Any], measure: Callable[[], int | None], *,
           poll_s: float | None = None) -> None:
    """Until ``proc`` exits, move the current tracker to ``measure()`` every ``poll_s`` (default:
    as often as the tracker reports) and once more at the end; returns when it exited (its
    exit status is the caller's to check), or at once when nothing is tracked.

    Why: some tools move the data themselves (``redis-cli --rdb`` writing a file, ``pg_restore``
    loading a database); their progress is only visible from outside (the file's size, the
    database's size). A measure that fails ends the measuring, never the operation. A
    ``checkpoint`` at least every second: the caller kills ``proc`` when ``Stopped`` passes."""
    tracker = current()
    if tracker is None and _STOP.get() is None:  # the caller's own wait is enough
        return
    poll_s = poll_s or max(MIN_POLL_S, tracker.every_s if tracker else 1.0)
    measuring = tracker is not None

    def take() -> None:
        nonlocal measuring
        try:
            value = measure()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            LOGGER.debug("%s: progress no longer measured: %s", tracker.what, exc)
            measuring = False
            return
        if value is not None:
            tracker.reach(value)  # type: ignore[union-attr]

    measured = time.monotonic()
    while True:
        checkpoint()
        try:
            proc.wait(timeout=min(poll_s, 1.0))
            break
        except subprocess.TimeoutExpired:
            if measuring and time.monotonic() - measured >= poll_s:
                take()
                measured = time.monotonic()
    if measuring:
        take()


# -- the command line: rich progress bars ------------------------------------------------------

class RichProgressHandler(logging.Handler):
    """Renders progress records as bars of a ``rich.progress.Progress``, one per tracker; other
    records are ignored."""

    def __init__(self, bars: Any) -> None:
        super().__init__(logging.INFO)
        self.bars = bars
        self.tasks: dict[int, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        snap = getattr(record, "progress", None)
        if not isinstance(snap, ProgressSnapshot):
            return
        completed, total = snap.done, snap.total
        if total is not None:
            total = max(total, completed)  # an estimate passed: the bar is full, not beyond
        if snap.final and not snap.failed:
            completed = total = max(completed, 1)  # done: a full bar, whatever the estimate
        task = self.tasks.get(snap.tracker)
        if task is None:  # a bar without a total pulses
            task = self.bars.add_task(snap.what, total=total, detail=snap.detail())
            self.tasks[snap.tracker] = task
        self.bars.update(task, completed=completed, total=total, detail=snap.detail())
        if snap.final:
            self.bars.stop_task(task)


@contextmanager
def rich_progress(console: Console | None = None, *, refresh_s: float = 0.2
                  ) -> Iterator[RichProgressHandler]:
    """Show every tracker started inside the block as a rich progress bar (for the command
    line, where there is no Dagster run log)::

        from rag_backup.progress import rich_progress

        with rich_progress():
            engine.backup(server, pending, ...)   # bars on stderr while it runs

    Each tracker gets a bar with its name, and beside it the same text a run log line has
    (done of total, percent, rate, time left), updated every ``refresh_s`` seconds instead of
    every 30 s; a finished tracker's bar stays, filled, with its final line. ``console``:
    where to draw (default: a ``rich.console.Console`` on stderr, so ``--json`` output on
    stdout stays clean). While the block runs, the progress records do not propagate to the
    root logger (no duplicate text lines beside the bars); afterwards the logger is as before.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress as Bars, TextColumn

    global _every_override
    bars = Bars(TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console or Console(stderr=True), refresh_per_second=4)
    handler = RichProgressHandler(bars)
    saved = (LOGGER.level, LOGGER.propagate, _every_override)
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    _every_override = refresh_s
    try:
        with bars:
            yield handler
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(saved[0])
        LOGGER.propagate, _every_override = saved[1], saved[2]
