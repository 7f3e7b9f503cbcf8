"""The Milvus engine's shared constants: the store, batch limits, the log callback."""

from __future__ import annotations

from collections.abc import Callable

STORE = "milvus"
ALL_PARTITIONS = "_all"  # directory of a partition-key collection's rows (not per partition)
MAX_BATCH = 16384  # pymilvus refuses larger iterator batches; the server's query window
MIN_BATCH = 64
ROWS = "rows"  # the unit of a backup's, verification's and restore's progress
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass
