"""The PostgreSQL engine's shared constants: the store, the artifacts' names, PostgreSQL's
identifier limit, the log callback."""

from __future__ import annotations

from collections.abc import Callable

STORE = "postgres"
DUMP_SUFFIX = ".dump.zst"
GLOBALS_ARTIFACT = "globals.sql.zst"
MAX_IDENTIFIER = 63
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass
