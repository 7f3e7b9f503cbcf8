"""What every part of the MinIO engine shares: the store's name, stream and queue sizes, the
default worker count and grace period, and the log callback type."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

STORE = "minio"
CHUNK = 1024 * 1024
MAX_QUEUED = 10_000                # snapshot lines waiting behind a slower download
IN_FLIGHT = 256                    # restore: transfers submitted and not yet counted
DEFAULT_WORKERS = 8
DEFAULT_GC_GRACE = timedelta(hours=48)
EXAMPLES = 5
OBJECTS = "objects"                # the unit of a backup's and a pre-flight's progress
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass
