"""Milvus backup, per collection of the configured database: a description
(``<collection>/schema.json``: every field with its params, primary key, auto_id, dynamic field,
partition key, description, consistency level, shards, properties, aliases, partitions and index
definitions, plus a few "probe" vectors with their top-k results on the source) and the rows,
read partition by partition with the server's iterator mode, paginated by a primary-key cursor
as pymilvus's ``query_iterator`` does (never the 16,384-row query window; see ``_iterate`` for
why it is driven here), converted batch by batch to Arrow and written with
``pyarrow.parquet.ParquetWriter`` straight into the repository's artifact stream
(``<collection>/<partition>/part-NNNNN.parquet``, a new file every ``rows_per_file`` rows, a row
group per batch, zstd, page checksums). Memory is bounded by one batch whatever the collection's
size. ``count(*)`` is read before and after: a difference means writes during the backup (both
are reported; the rows written are what a restore restores). A collection that is not loaded is
loaded for the backup and released again.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pymilvus
from pymilvus import DataType, MilvusClient
from pymilvus.client.constants import (
    COLLECTION_ID,
    GUARANTEE_TIMESTAMP,
    ITERATOR_FIELD,
    ITERATOR_SESSION_TS_FIELD,
    REDUCE_STOP_FOR_BEST,
)
from pymilvus.client.utils import mkts_from_datetime

from rag_backup import progress, repository
from rag_backup.engines.milvus.client import (
    MilvusServer,
    _state,
    calls,
    count_rows,
    list_collections,
    server_version,
)
from rag_backup.engines.milvus.common import (
    ALL_PARTITIONS,
    MAX_BATCH,
    MIN_BATCH,
    ROWS,
    STORE,
    Log,
    _quiet,
)
from rag_backup.engines.milvus.fingerprint import (
    CollectionFingerprint,
    MilvusFingerprint,
    fingerprint_of,
)
from rag_backup.engines.milvus.parquet import auto_batch_rows, to_record_batch, write_parquet
from rag_backup.engines.milvus.probes import (
    PROBE_LIMIT,
    PROBES,
    _probe_vector,
    probe_search,
    search_params,
)
from rag_backup.engines.milvus.schema import arrow_schema, describe, primary_field, vector_fields
from rag_backup.engines.prefetch import read_ahead
from rag_backup.errors import InvalidRequest, RagBackupError
from rag_backup.repository import PendingBackup

DESCRIPTION_FILE = "schema.json"
DEFAULT_ROWS_PER_FILE = 500_000


@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    """``fingerprint`` is ``MilvusFingerprint.to_dict()`` (what the manifest records)."""

    @property
    def rows(self) -> int:
        return fingerprint_of(self).rows

    @property
    def collections(self) -> dict[str, CollectionFingerprint]:
        return fingerprint_of(self).collections


def tool_versions() -> dict[str, str]:
    return {"pymilvus": pymilvus.__version__, "pyarrow": pa.__version__}


def _varint_end(data: bytes, pos: int) -> int:
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def take_float_vectors(batch: Any) -> dict[str, np.ndarray]:
    """The float vector columns of a query result as ``(rows, dim)`` float32 arrays, decoded in
    one copy from the protobuf message, and taken out of the rows' lazy materialization.

    pymilvus (3.0) materializes a float vector cell by cell (``strict_float32`` goes through a
    sequence of Python floats), which costs about 20 times the raw bytes transiently. A proto3
    ``repeated float`` serializes packed: one tag byte, a varint length, then the little-endian
    float32 values, which numpy reads as they are. Without the (private) lazy field list, the
    rows are used as they come."""
    lazy = getattr(batch, "_lazy_field_data", None)
    if not isinstance(lazy, list):
        return {}
    columns: dict[str, np.ndarray] = {}
    kept = []
    for field_data in lazy:
        if field_data.type != DataType.FLOAT_VECTOR or len(field_data.valid_data):
            kept.append(field_data)
            continue
        raw = field_data.vectors.float_vector.SerializeToString()
        dim = int(field_data.vectors.dim)
        flat = np.frombuffer(raw, dtype="<f4", offset=_varint_end(raw, 1)) if raw else \
            np.zeros(0, dtype=np.float32)
        if dim <= 0 or flat.size != dim * len(batch):
            kept.append(field_data)
            continue
        columns[field_data.field_name] = flat.reshape(len(batch), dim)
    batch._lazy_field_data = kept
    return columns


def _pk_literal(value: Any) -> str:
    """A primary key as an expression literal (JSON quoting escapes quotes and backslashes)."""
    return str(int(value)) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)


def _iterate(client: MilvusClient, server: MilvusServer, name: str, partition: str | None,
             batch_rows: int, primary: str
             ) -> Iterator[tuple[list[dict[str, Any]], dict[str, np.ndarray]]]:
    """Batches of rows (dynamic fields flattened in) with their float vector columns apart.

    The pagination of pymilvus's ``query_iterator`` (the server's iterator mode: results in
    primary key order, a pk cursor in the expression, one session timestamp for every batch),
    driven here so that a batch is never materialized row by row by pymilvus: its
    ``QueryIterator`` slices each result, which decodes every vector into Python objects and
    peaks at about 30 times the batch's raw size. Here a batch costs a few times its size."""
    where = f"reading collection {name!r}" + (f" partition {partition!r}" if partition else "")
    with calls(server, where):
        handler = client._get_connection()
        collection_id = client.describe_collection(name, timeout=server.timeout_s)[
            "collection_id"]
        options: dict[str, Any] = {ITERATOR_FIELD: "True", REDUCE_STOP_FOR_BEST: "True",
                                   COLLECTION_ID: collection_id}
        first = handler.query(name, expr="", output_fields=[], partition_names=[],
                              timeout=server.long_timeout_s, limit=1, **options)
        session_ts = int((getattr(first, "extra", None) or {}).get(ITERATOR_SESSION_TS_FIELD, 0))
        # Milvus 2.3 returns no session timestamp; pymilvus then uses the client's clock + 1 s
        options[GUARANTEE_TIMESTAMP] = session_ts or mkts_from_datetime(
            datetime.now(), milliseconds=1000.0)
    last: Any = None
    while True:
        expr = "" if last is None else f"{primary} > {_pk_literal(last)}"
        with calls(server, where):
            batch = handler.query(name, expr=expr, output_fields=["*"],
                                  partition_names=[partition] if partition else [],
                                  timeout=server.long_timeout_s, strict_float32=True,
                                  limit=batch_rows, **options)
        if not batch:
            return
        vectors = take_float_vectors(batch)
        rows = list(batch)  # the remaining lazy fields (strings, JSON, arrays) per row
        last = rows[-1][primary]
        yield rows, vectors


def backup_collection(client: MilvusClient, server: MilvusServer, name: str,
                      pending: PendingBackup, *, batch_rows: int = 0,
                      rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                      log: Log = _quiet) -> CollectionFingerprint:
    """One collection into ``pending``; returns its fingerprint."""
    started = time.monotonic()
    desc = describe(client, server, name)
    state = _state(client, server, name)
    was_loaded = state != "NotLoad"  # "Loading": someone else's load, waited for, kept
    if state != "Loaded":
        log(f"{name}: {state}; loading it for the backup" +
            (" (released afterwards)" if not was_loaded else ""))
        with calls(server, f"loading collection {name!r} (it needs an index on every vector "
                           "field to load)"):
            client.load_collection(name, timeout=server.long_timeout_s)
    try:
        desc["loaded"] = state
        batch = auto_batch_rows(desc, batch_rows)
        schema = arrow_schema(desc)
        rows_before = count_rows(client, server, name)
        sampler = random.Random(f"{name}:{rows_before}")
        sample: list[dict[str, Any]] = []
        seen = 0
        index_by_field = {i["field_name"]: i for i in desc["indexes"]}
        probe_field = next((f for f in vector_fields(desc) if f["name"] in index_by_field), None)
        pk = primary_field(desc)["name"]

        def batches(partition: str | None) -> Iterator[pa.RecordBatch]:
            nonlocal seen
            # the server reads the next batch while this one is sampled, converted,
            # compressed, encrypted and written
            fetched = read_ahead(_iterate(client, server, name, partition, batch, pk),
                                 name=f"milvus-read-{name}")
            with closing(fetched):
                for rows, vectors in fetched:
                    if probe_field is not None:
                        column = vectors.get(probe_field["name"])
                        for i, row in enumerate(rows):  # reservoir sample of the probe rows
                            seen += 1
                            slot = (len(sample) if len(sample) < PROBES
                                    else sampler.randrange(seen))
                            if slot < PROBES:
                                value = (column[i] if column is not None
                                         else row[probe_field["name"]])
                                sample[slot:slot + 1] = [{"id": row[pk], "vector": _probe_vector(
                                    probe_field, value)}]
                    progress.advance(len(rows), unit=ROWS)
                    yield to_record_batch(rows, desc, schema, vectors)

        targets = [None] if desc["partition_key"] else desc["partitions"]
        files: dict[str, int] = {}
        per_partition: dict[str, int] = {}
        with progress.tracking(f"{STORE} backup of collection {name}", rows_before, ROWS):
            for partition in targets:
                label = partition or ALL_PARTITIONS
                written = write_parquet(pending, f"{name}/{label}", batches(partition), schema,
                                        rows_per_file)
                files.update(written)
                per_partition[label] = sum(written.values())
                log(f"{name}/{label}: {per_partition[label]} rows in {len(written)} Parquet files")
        rows_after = count_rows(client, server, name)
        rows = sum(per_partition.values())
        if probe_field is not None and sample:
            index = index_by_field[probe_field["name"]]
            probes: dict[str, Any] = {
                "field": probe_field["name"], "field_type": probe_field["type"], "primary": pk,
                "limit": min(PROBE_LIMIT, max(rows, 1)),
                "search_params": search_params(desc, index), "queries": []}
            for entry in sample:
                ids, distances = probe_search(client, server, name, probes, entry["vector"])
                probes["queries"].append({**entry, "ids": ids, "distances": distances})
            desc["probes"] = probes
        with pending.artifact(f"{name}/{DESCRIPTION_FILE}") as out:
            out.write(json.dumps(desc, indent=2, ensure_ascii=False, sort_keys=True).encode())
    finally:
        if not was_loaded:
            with suppress(RagBackupError), calls(server, f"releasing collection {name!r}"):
                client.release_collection(name, timeout=server.long_timeout_s)
    consistent = rows_before == rows_after == rows
    if not consistent:
        log(f"WARNING {name}: count(*) was {rows_before} before and {rows_after} after the "
            f"backup, {rows} rows were written: the collection changed during the backup")
    log(f"{name}: {rows} rows, {len(files)} files in {time.monotonic() - started:.1f} s")
    return CollectionFingerprint(rows, rows_before, rows_after, consistent, desc["auto_id"],
                                 per_partition, files, f"{name}/{DESCRIPTION_FILE}")


def backup(server: MilvusServer, pending: PendingBackup, *,
           collections: Sequence[str] | None = None, batch_rows: int = 0,
           rows_per_file: int = DEFAULT_ROWS_PER_FILE, log: Log = _quiet) -> BackupOutcome:
    """Every configured collection (default: all of the database) into ``pending``."""
    if batch_rows and not MIN_BATCH <= batch_rows <= MAX_BATCH:
        raise InvalidRequest(f"batch_rows must be between {MIN_BATCH} and {MAX_BATCH} (0: "
                             f"automatic), not {batch_rows}")
    if rows_per_file < 1:
        raise InvalidRequest(f"rows_per_file must be positive, not {rows_per_file}")
    with server.session() as client:
        version = server_version(client, server)
        available = list_collections(client, server)
        chosen = list(dict.fromkeys(collections)) if collections else available
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise InvalidRequest(f"{server.describe()} has no collection(s) "
                                 f"{', '.join(missing)}; it has: "
                                 f"{', '.join(available) or '(none)'}")
        per_collection = {name: backup_collection(client, server, name, pending,
                                                  batch_rows=batch_rows,
                                                  rows_per_file=rows_per_file, log=log)
                          for name in chosen}
    fingerprint = MilvusFingerprint(server.db_name, per_collection)
    return BackupOutcome(fingerprint.to_dict(), tool_versions(), version)
