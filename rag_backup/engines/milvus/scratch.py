"""Verbs for recovery and the restore drill: dropping scratch collections, reading the
primary keys of a collection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import suppress
from typing import Any

from rag_backup.engines.milvus.client import MilvusServer, calls
from rag_backup.engines.milvus.common import MAX_BATCH, MIN_BATCH


def iter_primary_keys(server: MilvusServer, name: str, *, batch_rows: int = 8192
                      ) -> Iterator[list[Any]]:
    """The primary keys of every entity of a loaded collection, in batches of at most
    ``batch_rows`` (the server's iterator: only the key field is read, memory is one batch)."""
    batch_rows = max(MIN_BATCH, min(batch_rows, MAX_BATCH))
    with server.session() as client:
        where = f"reading the primary keys of {name!r}"
        with calls(server, where):
            info = client.describe_collection(name, timeout=server.timeout_s)
            primary = next(f["name"] for f in info["fields"] if f.get("is_primary"))
            iterator = client.query_iterator(name, batch_size=batch_rows,
                                             output_fields=[primary],
                                             timeout=server.long_timeout_s)
        try:
            while True:
                with calls(server, where):
                    batch = iterator.next()
                if not batch:
                    return
                yield [row[primary] for row in batch]
        finally:
            with suppress(Exception):
                iterator.close()


def drop_collections(server: MilvusServer, names: Sequence[str]) -> list[str]:
    """Drop each collection of ``names`` that exists on ``server`` (scratch targets of a
    restore or a drill); the ones that were there. Unlike a staging copy's clean-up, a failure
    is raised, naming the collection."""
    dropped = []
    with server.session() as client:
        for name in names:
            with calls(server, f"dropping collection {name!r}"):
                if client.has_collection(name, timeout=server.timeout_s):
                    client.drop_collection(name, timeout=server.timeout_s)
                    dropped.append(name)
    return dropped
