"""What the command line prints: rich tables on stdout for people, JSON for scripts
(``--json``), one line on stderr for an error, and the engines' log lines on stderr.

stdout carries only the result, so ``--json`` output can be piped; everything else goes to
stderr. Log lines are shown on a terminal (or with ``--verbose``); a script that redirects
stderr without ``--verbose`` sees only the error line, if any.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

PROG = "rag-backup"
WIDE = 160  # columns of a table written to a pipe or file (rich would use 80)
_state = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    """``--verbose``: log lines on stderr even when it is not a terminal; otherwise the
    client libraries' own warnings (pymilvus logs some for every iterator) are kept off it."""
    _state["verbose"] = verbose
    if not verbose:
        logging.getLogger("pymilvus").setLevel(logging.ERROR)


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = WIDE
    return console


def one_line(text: str) -> str:
    """``text`` on one line: a tool's multi-line stderr joined with `` | ``."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    return " | ".join(line for line in lines if line) or "(no message)"


def error(message: str) -> None:
    """The operator's one line on stderr: ``rag-backup: <message>``."""
    click.echo(f"{PROG}: {one_line(message)}", err=True)


def log(message: str) -> None:
    """An engine's log line: on stderr when it is a terminal or with ``--verbose``."""
    console = _console(stderr=True)
    if _state["verbose"] or console.is_terminal:
        stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
        console.print(Text.assemble((stamp + " ", "dim"), one_line(message)))


class _LogLines(logging.Handler):
    """Progress records (``rag_backup.progress``) as log lines."""

    def emit(self, record: logging.LogRecord) -> None:
        log(record.getMessage())


@contextmanager
def progress_display() -> Iterator[None]:
    """How long operations show their progress (``rag_backup.progress``): bars on stderr when
    it is a terminal, log lines with ``--verbose``, nothing otherwise."""
    progress = logging.getLogger("rag_backup.progress")
    if _console(stderr=True).is_terminal:
        try:
            from rag_backup.progress import rich_progress
        except ImportError:  # pragma: no cover - a release without progress bars
            yield
            return
        with rich_progress(_console(stderr=True)):
            yield
    elif _state["verbose"]:
        handler, level = _LogLines(), progress.level
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        try:
            yield
        finally:
            progress.removeHandler(handler)
            progress.setLevel(level)
    else:
        yield


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str, ensure_ascii=False))


def print_table(table: Table) -> None:
    _console().print(table)


def print_line(text: str, style: str = "") -> None:
    _console().print(Text(text, style=style))


# -- formatting ----------------------------------------------------------------------------

def size(n: int | None) -> str:
    """Bytes for people: ``812 B``, ``1.4 MiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached


def duration(seconds: float | None) -> str:
    """Seconds for people: ``4.2 s``, ``3m 07s``, ``1h 02m``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def when(moment: datetime | None) -> str:
    """A time in UTC, to the second."""
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def scalar(value: Any) -> str:
    """A value in one table cell."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list)) for v in value):
            return ", ".join(scalar(v) for v in value) or "-"
        return json.dumps(value, default=str, ensure_ascii=False)
    if isinstance(value, dict):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def flatten(doc: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A nested summary as (dotted key, cell) rows; lists of records one row per record."""
    rows: list[tuple[str, str]] = []
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            rows += [(f"{name}[{i}]", scalar(v)) for i, v in enumerate(value)]
        else:
            rows.append((name, scalar(value)))
    return rows


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          styles: Mapping[str, str] | None = None) -> Table:
    """A table of plain text cells (never read as rich markup: names may hold brackets)."""
    styles = styles or {}
    out = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        out.add_column(column, overflow="fold", style=styles.get(column))
    for row in rows:
        out.add_row(*(cell if isinstance(cell, Text) else Text(scalar(cell)) for cell in row))
    return out


def key_values(title: str | None, pairs: Iterable[tuple[str, Any]]) -> Table:
    return table(title, ("field", "value"), pairs, styles={"field": "bold"})


def state_text(state: str) -> Text:
    """A verification or check state, coloured: yes / passed green, no / not run yellow,
    anything else (FAILED, DAMAGED, failed) red."""
    colour = {"yes": "green", "passed": "green", "no": "yellow", "not run": "yellow"}
    return Text(state, style=colour.get(state, "bold red"))


def differing(summary: Any) -> bool:
    """Whether a restore's summary reports a comparison that does not match (any ``matches``
    or ``matches_*`` field false, at any depth)."""
    if isinstance(summary, Mapping):
        for key, value in summary.items():
            if str(key).startswith("matches") and value is False:
                return True
            if differing(value):
                return True
    elif isinstance(summary, list):
        return any(differing(v) for v in summary)
    return False


